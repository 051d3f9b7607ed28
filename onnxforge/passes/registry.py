"""Pass registry: names → pass classes, option coercion, and plugins.

Passes register with ``@register_pass("kebab-name")``. Third-party packages register through the
entry-point group ``onnxforge.passes`` (each entry point names a module to import, or a pass class to
register under the entry point's name); ``--plugin module`` imports a module that registers passes.
Any :class:`onnx_ir.passes.PassBase` subclass can be registered, not only :class:`~.base.Pass`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from importlib import metadata
from typing import Any, Callable

import onnx_ir as ir

from onnxforge.errors import PassOptionError, PluginError, UnknownPassError
from onnxforge.passes.base import PassContext, option_specs

ENTRY_POINT_GROUP = "onnxforge.passes"
_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

_REGISTRY: dict[str, type[ir.passes.PassBase]] = {}
_builtins_loaded = False
_entry_points_loaded = False


def register_pass(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator registering a pass under a kebab-case ``name``."""
    if not _NAME_RE.match(name):
        raise ValueError(f"pass name {name!r} must be kebab-case (e.g. 'fold-batchnorm')")

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, ir.passes.PassBase)):
            raise TypeError(f"{cls!r} is not an onnx_ir.passes.PassBase subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and not replace:
            raise ValueError(f"pass name {name!r} is already registered by {existing.__qualname__}")
        _REGISTRY[name] = cls
        if "name" not in cls.__dict__ or not getattr(cls, "name", ""):
            try:
                cls.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
        return cls

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("onnxforge.passes.builtin")


def load_entry_points() -> None:
    """Import every plugin registered under the ``onnxforge.passes`` entry-point group."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must name itself
            raise PluginError(f"plugin entry point {ep.name!r} ({ep.value}) failed to load: {e}") from e
        if isinstance(obj, type) and issubclass(obj, ir.passes.PassBase) and obj not in _REGISTRY.values():
            register_pass(ep.name)(obj)


def load_plugin(module: str) -> None:
    """Import ``module`` (a dotted name, or a path to a ``.py`` file) so its passes register."""
    try:
        if module.endswith(".py"):
            import importlib.util
            import pathlib

            path = pathlib.Path(module)
            if not path.is_file():
                raise PluginError(f"plugin file not found: {module}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            importlib.import_module(module)
    except PluginError:
        raise
    except Exception as e:
        raise PluginError(f"plugin {module!r} failed to import: {e}") from e


def available_passes() -> dict[str, type[ir.passes.PassBase]]:
    """All registered passes (built-ins and plugins), sorted by name."""
    _load_builtins()
    load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[ir.passes.PassBase]:
    passes = available_passes()
    if name not in passes:
        import difflib

        close = difflib.get_close_matches(name, passes, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run 'onnxforge passes' to list them"
        raise UnknownPassError(f"unknown pass {name!r}{hint}")
    return passes[name]


def create_pass(
    name: str, options: dict[str, Any] | None = None, context: PassContext | None = None
) -> ir.passes.PassBase:
    """Instantiate pass ``name`` with ``options`` (strings are converted to the annotated types)."""
    cls = get_pass_class(name)
    specs = option_specs(cls)
    kwargs: dict[str, Any] = {}
    hints = _type_hints(cls)
    for key, value in (options or {}).items():
        if key not in specs:
            known = ", ".join(specs) or "none"
            raise PassOptionError(f"pass {name!r} has no option {key!r} (options: {known})")
        kwargs[key] = coerce_option(name, key, value, hints.get(key, specs[key].annotation))
    try:
        instance = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PassOptionError(f"pass {name!r}: {e}") from e
    if context is not None and hasattr(instance, "context"):
        instance.context = context
    return instance


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:
        return {}


def coerce_option(pass_name: str, key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` to ``annotation`` (bool, int, float, str, list[...], Literal[...], Optional)."""
    where = f"pass {pass_name!r} option {key!r}"
    if annotation is inspect.Parameter.empty or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_option(pass_name, key, value, arg)
            except PassOptionError as e:
                errors.append(str(e))
        raise PassOptionError(f"{where}: {value!r} does not fit {_type_name(annotation)}")
    if origin is typing.Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise PassOptionError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = args[0] if args else Any
        converted = [coerce_option(pass_name, key, v, item_type) for v in items]
        return tuple(converted) if origin is tuple or annotation is tuple else converted
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise PassOptionError(f"{where}: expected a table/dict, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise PassOptionError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise PassOptionError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise PassOptionError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise PassOptionError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PassOptionError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (list, dict)):
            raise PassOptionError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def describe_options(cls: type) -> list[tuple[str, str, str]]:
    """(name, type, default) for each option of ``cls``, for ``onnxforge passes``."""
    hints = _type_hints(cls)
    rows = []
    for name, p in option_specs(cls).items():
        ann = hints.get(name, p.annotation)
        type_name = "" if ann is inspect.Parameter.empty else _type_name(ann)
        default = "" if p.default is inspect.Parameter.empty else repr(p.default)
        rows.append((name, type_name, default))
    return rows
