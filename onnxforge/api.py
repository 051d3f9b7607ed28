"""The small public Python API: load, save, optimize, export."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import onnx
import onnx_ir as ir

from onnxforge.passes.base import PassContext
from onnxforge.passes.manager import Pipeline, PipelineResult
from onnxforge.passes.spec import DEFAULT_PRESET, PassSpec


def optimize(
    model: ir.Model | onnx.ModelProto | bytes | str | os.PathLike,
    passes: str | Sequence[ir.passes.PassBase | PassSpec | str] = DEFAULT_PRESET,
    *,
    target: str | None = None,
    calibration_data: Any = None,
    providers: Sequence[str] | None = None,
    verify: bool = False,
    fixed_point: bool = False,
    explain: bool | None = None,
    seed: int | None = None,
    context: PassContext | None = None,
    output: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    reproducer_dir: str | os.PathLike | None = None,
) -> PipelineResult:
    """Run a pipeline over ``model`` and return ``PipelineResult(model, modified, stats, report)``.

    ``model`` may be a path (never modified), bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``
    (rewritten in place). ``passes`` is a preset (``"O1"``), a pipeline string, or pass instances.
    ``calibration_data`` is an ``.npz`` path, a directory, an iterable of feed dicts or a
    :class:`~onnxforge.runtime.data.CalibrationData`.

    ``context``: a :class:`PassContext` to start from (e.g. with ``importance`` or ``options``).
    ``target``, ``calibration_data``, ``providers``, ``explain`` and ``seed``, when given, override its
    fields on a copy (the caller's context is not changed); left out, the context's values stand
    (without a context: cpu, no data, ``("cpu",)``, False, 0). Calibration data in either place is
    loaded and checked against the model.
    """
    from onnxforge.ir.io import load, save
    from onnxforge.runtime import data as calibration

    ir_model = load(model)
    overrides: dict[str, Any] = {
        key: value
        for key, value in (("target", target), ("explain", explain), ("seed", seed))
        if value is not None
    }
    if providers is not None:
        overrides["providers"] = tuple(providers)
    base = context if context is not None else PassContext()
    data = calibration_data if calibration_data is not None else base.calibration_data
    if data is not None:
        overrides["calibration_data"] = calibration.load(data, ir_model)
    # dataclasses.replace re-runs PassContext's validation (unknown target -> PassOptionError).
    context = dataclasses.replace(base, **overrides) if overrides or context is None else context
    pipeline = Pipeline(
        passes, context=context, verify=verify, fixed_point=fixed_point, reproducer_dir=reproducer_dir
    )
    result = pipeline.run(ir_model)
    if output is not None:
        save(result.model, output)
    if report_path is not None and result.report is not None:
        result.report.write_json(report_path)
    return result


def export(module: Any, example_inputs: Any, path: str | os.PathLike | None = None, **kwargs: Any) -> ir.Model:
    """Export a ``torch.nn.Module`` to ONNX (see :func:`onnxforge.torch_export.export`)."""
    from onnxforge.torch_export import export as _export

    return _export(module, example_inputs, path, **kwargs)
