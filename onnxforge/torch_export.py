"""Export a ``torch.nn.Module`` to an ``onnx_ir.Model``.

A thin, predictable front end over :func:`torch.onnx.export`:

* ``dynamo=True`` (default) uses the ``torch.export``-based exporter; ``dynamo=False`` the TorchScript
  exporter. The dynamo exporter only writes opset 18 and later; an older ``opset`` with ``dynamo=True``
  falls back to the TorchScript exporter (with a log message), since down-converting a dynamo graph
  fails for common ops (``ReduceMean`` with ``axes`` as an input, for example).
* The batch axis (axis 0) of every input and output is dynamic (``dynamic_batch=True``), named
  ``batch``; more dynamic axes come from ``dynamic_axes`` (``{"input_ids": {1: "seq"}}``), the same
  mapping for both exporters.
* The module is exported in eval mode (its previous mode is restored afterwards).
* The graph keeps every op the module has. Both exporters would fold BatchNormalization into the
  preceding Conv/Gemm and apply other fusions by default; that is onnxforge's job, so by default only a
  structural cleanup runs: function inlining, constant folding of shape arithmetic, removal of unused
  nodes and opsets, constants lifted into initializers (``optimize=False``). ``optimize=True`` runs
  torch's full ONNX optimizer instead (fusions included).
* Weights are initializers (never graph inputs). The result passes ``onnx.checker``.

torch is optional: it is imported only when :func:`export` is called.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx_ir as ir

from onnxforge.errors import MissingDependencyError, ModelSaveError, UnsupportedModelError

logger = logging.getLogger(__name__)

TORCH_INSTALL_HINT = "pip install 'onnxforge[torch]' (torch==2.13.0 CPU build)"
DYNAMO_MIN_OPSET = 18
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
BATCH_DIM = "batch"


def import_torch():
    """Import torch, or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(f"exporting a torch module needs torch: {TORCH_INSTALL_HINT}") from exc
    return torch


def export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    *,
    opset: int = 18,
    dynamo: bool = True,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    optimize: bool = False,
) -> ir.Model:
    """Export ``module`` called on ``example_inputs`` to ONNX and return it as an ``onnx_ir.Model``.

    Args:
        module: a ``torch.nn.Module``.
        example_inputs: a tensor or a tuple of tensors (positional arguments of ``forward``).
        path: if given, the model is also written there (atomically: temporary file, then rename).
        opset: ONNX opset of the default domain. Below 18 the TorchScript exporter is used.
        dynamo: use the ``torch.export``-based exporter (else the TorchScript one).
        dynamic_batch: make axis 0 of every input and output a symbolic ``batch`` dimension.
        dynamic_axes: more dynamic axes, ``{input_name: {axis: dim_name}}``; the same ``dim_name`` in
            two places means the same size.
        input_names: graph input names; default ``input`` for one input, else the names of
            ``forward``'s parameters.
        output_names: graph output names; default ``output`` for one output, else ``output_0``, ...
        optimize: run torch's full ONNX optimizer (folds BatchNorm into Conv and other fusions) instead
            of the structural cleanup only.

    Raises:
        MissingDependencyError: torch is not installed.
        UnsupportedModelError: torch could not export the module (the message has torch's reason).
        ModelSaveError: ``path`` could not be written.
    """
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(f"export: expected a torch.nn.Module, got {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    input_names = list(input_names) if input_names is not None else _default_input_names(module, len(args))
    if len(input_names) != len(args):
        raise UnsupportedModelError(f"export: {len(input_names)} input_names for {len(args)} example inputs")

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            n_outputs = len(_flatten_outputs(module(*args)))
        if output_names is None:
            output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
        output_names = list(output_names)
        axes = _merge_axes(input_names, output_names, dynamic_batch, dynamic_axes)
        if dynamo and opset < DYNAMO_MIN_OPSET:
            logger.info("export: opset %d < %d, using the TorchScript exporter", opset, DYNAMO_MIN_OPSET)
            dynamo = False
        with _quiet_torch() as captured:
            try:
                if dynamo:
                    model = _export_dynamo(torch, module, args, opset, input_names, output_names, axes, optimize)
                else:
                    model = _export_torchscript(torch, module, args, opset, input_names, output_names, axes)
            except (MissingDependencyError, UnsupportedModelError):
                raise
            except Exception as exc:
                tail = _ANSI.sub("", captured.getvalue()[-2000:])
                exporter = "dynamo" if dynamo else "TorchScript"
                raise UnsupportedModelError(
                    f"export: torch.onnx.export ({exporter} exporter, opset {opset}) failed for "
                    f"{type(module).__name__}: {type(exc).__name__}: {_ANSI.sub('', str(exc))}"
                    + (f"\n--- exporter output ---\n{tail}" if tail.strip() else "")
                    + ("\nTry dynamo=False." if dynamo else "")
                ) from exc
    finally:
        module.train(was_training)

    if not optimize or not dynamo:
        _cleanup(model)
    model.producer_name = "onnxforge.export"
    onnx.checker.check_model(ir.to_proto(model))
    if path is not None:
        save_atomic(model, path)
    return model


def save_atomic(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` (weights inline) to ``path`` through a temporary file and ``os.replace``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        data = ir.to_proto(model).SerializeToString()
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise ModelSaveError(f"export: cannot write {path}: {exc}") from exc


# --- internals -------------------------------------------------------------------------------------


def _default_input_names(module: Any, n: int) -> list[str]:
    if n == 1:
        return ["input"]
    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]


def _flatten_outputs(out: Any) -> list[Any]:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten_outputs(o)]
    return [out]


def _merge_axes(
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        for name in [*input_names, *output_names]:
            axes[name] = {0: BATCH_DIM}
    for name, mapping in (dynamic_axes or {}).items():
        if name not in input_names and name not in output_names:
            raise UnsupportedModelError(
                f"export: dynamic_axes names {name!r}, which is neither an input {input_names} "
                f"nor an output {output_names}"
            )
        if isinstance(mapping, Mapping):
            axes.setdefault(name, {}).update({int(a): str(d) for a, d in mapping.items()})
        else:  # a list of axes, as torch accepts
            axes.setdefault(name, {}).update({int(a): f"{name}_dim{a}" for a in mapping})
    return axes


def _export_dynamo(torch, module, args, opset, input_names, output_names, axes, optimize) -> ir.Model:
    dims: dict[str, Any] = {}

    def dim(name: str):
        if name not in dims:
            dims[name] = torch.export.Dim(name)
        return dims[name]

    dynamic_shapes = tuple(
        {axis: dim(d) for axis, d in axes.get(name, {}).items()} or None for name in input_names
    )
    with _cached_torchlib_registry():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes if any(s is not None for s in dynamic_shapes) else None,
            optimize=optimize,
            verbose=False,
            external_data=False,
        )
    return program.model


_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def _cached_torchlib_registry():
    """Reuse the dynamo exporter's aten->ONNX registry between exports (building it takes ~1-2 s each
    time). torch is pinned; if its internals differ from 2.13's, this silently does nothing."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    cls = _registration.ONNXRegistry
    original = cls.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return

    def from_torchlib(klass, opset_version=18):
        if klass is not cls:
            return original.__func__(klass, opset_version=opset_version)
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = original.__func__(klass, opset_version=opset_version)
        return _REGISTRIES[opset_version]

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _export_torchscript(torch, module, args, opset, input_names, output_names, axes) -> ir.Model:
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        args,
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=axes or None,
        # Eval mode without torch's peephole pass: it would fold BatchNorm into Conv.
        training=torch.onnx.TrainingMode.EVAL,
        do_constant_folding=False,
        export_params=True,
        keep_initializers_as_inputs=False,
    )
    return ir.from_proto(onnx.load_from_string(buffer.getvalue()))


def _cleanup(model: ir.Model) -> None:
    """Structural cleanup that keeps every compute op: what both exporters leave for a compiler."""
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    if model.functions:
        common.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.RemoveInitializersFromInputsPass(),
    )(model)


@contextlib.contextmanager
def _quiet_torch():
    """Capture the exporters' progress prints, warnings and log lines; yields the captured text."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
