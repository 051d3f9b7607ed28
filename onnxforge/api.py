"""The small public Python API: load, save, optimize, export."""

from __future__ import annotations

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
    target: str = "cpu",
    calibration_data: Any = None,
    verify: bool = False,
    fixed_point: bool = False,
    explain: bool = False,
    seed: int = 0,
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
    """
    from onnxforge.ir.io import load, save

    ir_model = load(model)
    if context is None:
        data = None
        if calibration_data is not None:
            from onnxforge.runtime import data as calibration

            data = calibration.load(calibration_data, ir_model)
        context = PassContext(target=target, calibration_data=data, explain=explain, seed=seed)
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
