"""Every private API of a dependency that onnxforge uses still exists, and its version is bounded.

onnxforge reuses onnxscript's rules and constant folder and onnxruntime's symbolic shape inference
where they have no public API. A private name can vanish in any release; a rule that silently fails
to import would mean fusions quietly stop happening. So this file finds every such use **by reading
onnxforge's source** (``ast``; no list to keep in sync) and checks each one against the installed
packages, one test per symbol, failing with the symbol, where onnxforge uses it, and the version:

- ``from pkg.mod import _name`` / ``from pkg._mod import name`` / ``import pkg._mod`` (any private
  path component) for pkg in onnxscript, onnxruntime, onnx_ir, onnx, torch;
- ``alias.attr`` on an imported private module (``_constant_folding.FoldConstantsPass``);
- private methods and attributes used on a ``SymbolicShapeInference`` instance (``._preprocess``).

And pyproject.toml must give each such package an upper version bound that the installed version
satisfies: an upgrade is a deliberate act that runs this file.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.metadata
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxforge"
WATCHED = {"onnxscript": "onnxscript", "onnxruntime": "onnxruntime", "onnx_ir": "onnx-ir", "onnx": "onnx",
           "torch": "torch"}
SSI_CLASS = "SymbolicShapeInference"


@dataclasses.dataclass(frozen=True)
class Use:
    module: str      # importable module path
    attr: str | None  # attribute looked up on it (None: the module itself)
    where: str       # file:line in onnxforge
    kind: str = "module"  # module | instance (an attribute of a SymbolicShapeInference object)

    @property
    def symbol(self) -> str:
        return self.module + (f".{self.attr}" if self.attr else "")

    @property
    def dist(self) -> str:
        return WATCHED[self.module.split(".")[0]]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _scan_file(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[Use]:
    tree = ast.parse(path.read_text(), str(path))
    rel = path.relative_to(root)
    uses: list[Use] = []
    private_aliases: dict[str, str] = {}  # local name -> module path of an imported private module
    public_aliases: dict[str, str] = {}   # local name -> module path of an imported public module
    ssi_modules: set[str] = set()         # local names bound to onnxruntime.tools.symbolic_shape_infer
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            root = node.module.split(".")[0]
            if root not in WATCHED:
                continue
            path_private = any(_private(p) for p in node.module.split("."))
            for alias in node.names:
                local = alias.asname or alias.name
                full = f"{node.module}.{alias.name}"
                if node.module.endswith("symbolic_shape_infer") and alias.name == SSI_CLASS:
                    ssi_modules.add(f"{local}#class")
                if full.endswith("tools.symbolic_shape_infer"):
                    ssi_modules.add(local)
                if path_private or _private(alias.name):
                    uses.append(Use(node.module, alias.name, f"{rel}:{node.lineno}"))
                    if _is_module(full):
                        private_aliases[local] = full
                elif _is_module(full):
                    public_aliases[local] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in WATCHED and any(_private(p) for p in alias.name.split(".")):
                    uses.append(Use(alias.name, None, f"{rel}:{node.lineno}"))
                    if alias.asname:
                        private_aliases[alias.asname] = alias.name
                elif root in WATCHED and alias.asname:
                    public_aliases[alias.asname] = alias.name
                if alias.name.endswith("tools.symbolic_shape_infer"):
                    ssi_modules.add(alias.asname or alias.name)
    # attributes used on imported private modules, and private attributes of public ones
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in private_aliases:
                uses.append(Use(private_aliases[node.value.id], node.attr, f"{rel}:{node.lineno}"))
            elif node.value.id in public_aliases and _private(node.attr):
                uses.append(Use(public_aliases[node.value.id], node.attr, f"{rel}:{node.lineno}"))
    # private members used on SymbolicShapeInference objects: x = ssi.SymbolicShapeInference(...); x._foo
    instances: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            f = node.value.func
            is_ssi = (isinstance(f, ast.Attribute) and f.attr == SSI_CLASS and isinstance(f.value, ast.Name)
                      and f.value.id in ssi_modules) or (isinstance(f, ast.Name) and f"{f.id}#class" in ssi_modules)
            if is_ssi:
                instances.update(t.id for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in instances
                and (_private(node.attr) or node.attr.endswith("_"))):
            uses.append(Use(f"onnxruntime.tools.symbolic_shape_infer.{SSI_CLASS}", node.attr, f"{rel}:{node.lineno}",
                            kind="instance"))
    return uses


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def scan() -> list[Use]:
    seen: dict[str, Use] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for use in _scan_file(path):
            seen.setdefault(use.symbol, use)
    return sorted(seen.values(), key=lambda u: u.symbol)


USES = scan()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _ssi_instance():
    """A SymbolicShapeInference that has run on a tiny model (so its run-time attributes exist)."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.tools import symbolic_shape_infer as ssi

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    inference = ssi.SymbolicShapeInference(2**31 - 1, True, False, 0)
    inference._preprocess(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    assert isinstance(inference.out_mp_, onnx.ModelProto)
    return inference


def test_the_scan_finds_the_known_private_uses():
    """The scanner works: it finds the uses we know are there today (update this list when one goes away)."""
    symbols = {u.symbol for u in USES}
    modules = {u.module for u in USES}
    print("\n".join(f"{u.symbol}  ({u.where})" for u in USES))
    assert USES, "no private dependency API found: if that is true now, delete this file and loosen the bounds"
    assert any(m.startswith("onnxscript") for m in modules), symbols


def problem(use: Use) -> str | None:
    """Why ``use`` no longer resolves with the installed packages (None: it does)."""
    version = _version(use.dist)
    message = (f"onnxforge uses {use.symbol} ({use.where}), which {use.dist} {version} does not provide. "
               f"This is a private API: find its new home (or a public replacement) before widening the "
               f"{use.dist} bound in pyproject.toml.")
    if use.kind == "instance":
        try:
            found = hasattr(_ssi_instance(), use.attr)
        except Exception as e:  # the class or one of the methods the probe needs is gone
            return f"{message} (running SymbolicShapeInference the way onnxforge does failed: {e!r})"
        return None if found else message
    try:
        module = importlib.import_module(use.module)
    except ImportError as e:
        return f"{message} (import failed: {e})"
    if use.attr is None or hasattr(module, use.attr) or _is_module(f"{use.module}.{use.attr}"):
        return None
    return message


@pytest.mark.parametrize("use", USES, ids=[u.symbol for u in USES])
def test_private_api_still_exists(use: Use):
    if use.dist == "torch" and _version("torch") == "not installed":
        pytest.skip("torch is optional")
    why = problem(use)
    if why:
        pytest.fail(why)


def test_a_vanished_private_api_fails_with_symbol_and_version(tmp_path):
    """The check can fail: a file using names onnxscript does not have is caught, naming them."""
    fake = tmp_path / "onnxforge" / "probe.py"
    fake.parent.mkdir()
    source = ("from onnxscript.rewriter.rules.common import _no_such_rules\n"
              "from onnxscript.optimizer import _constant_folding\n"
              "x = _constant_folding.NoSuchFolder\n"
              "from onnxscript.rewriter.rules import common as common_rules\n"
              "y = common_rules._no_such_private, common_rules.public_is_not_checked\n")
    fake.write_text(source)
    uses = {u.symbol: u for u in _scan_file(fake, tmp_path)}
    version = _version("onnxscript")
    gone = problem(uses["onnxscript.rewriter.rules.common._no_such_rules"])
    assert gone and "_no_such_rules" in gone and f"onnxscript {version}" in gone
    attr = problem(uses["onnxscript.optimizer._constant_folding.NoSuchFolder"])
    assert attr and "NoSuchFolder" in attr and "onnxforge/probe.py:3" in attr
    assert problem(uses["onnxscript.optimizer._constant_folding"]) is None
    assert "_no_such_private" in problem(uses["onnxscript.rewriter.rules.common._no_such_private"])
    assert "onnxscript.rewriter.rules.common.public_is_not_checked" not in uses


def _requirements() -> dict[str, object]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    out: dict[str, object] = {}
    for r in reqs:
        out.setdefault(r.name.lower(), r)
    return out


@pytest.mark.parametrize("dist", sorted({u.dist for u in USES}))
def test_packages_with_private_uses_have_an_upper_bound_that_holds(dist: str):
    req = _requirements().get(dist)
    assert req is not None, f"{dist} is used (privately) but not a dependency in pyproject.toml"
    ops = {s.operator for s in req.specifier}
    assert ops & {"<", "<=", "==", "~="}, (
        f"pyproject.toml: {req} has no upper bound, but onnxforge uses private APIs of {dist}: "
        + ", ".join(u.symbol for u in USES if u.dist == dist))
    version = _version(dist)
    if version != "not installed":
        assert req.specifier.contains(version, prereleases=True), f"installed {dist} {version} is outside {req}"
