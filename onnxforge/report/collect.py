"""What the HTML report needs beyond the pipeline's :class:`~onnxforge.passes.manager.Report`.

- :class:`FloatSnapshot`: an ``on_pass`` hook that keeps the model as it was just before the first
  lossy pass (the same float reference the pipeline gives data-driven passes as their teacher), so
  that layer names match the quantized model's.
- :func:`float_ops`: the nodes a quantization pass left float, with its reason (``stats.skip``).
- :func:`quantized_nodes`: the node names a quantization pass reports in ``details["quantized_nodes"]``.
- :func:`quant_error`: per-layer SQNR of those nodes (:mod:`onnxforge.runtime.sqnr`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import onnx_ir as ir

from onnxforge.ir.io import deep_copy, model_to_bytes
from onnxforge.passes.manager import PassRecord, Report
from onnxforge.runtime.sqnr import LayerSQNR, layer_sqnr


def _is_quantize(record: PassRecord) -> bool:
    return record.name.startswith("quantize")


class FloatSnapshot:
    """Call with each :class:`PassRecord` (as ``Pipeline(on_pass=...)``) while ``model`` is rewritten in place.

    ``reference`` is a copy of the model after the last lossless pass that ran before the first lossy
    one (the input model when the first pass is lossy). External and spilled weights stay references
    to their files (:func:`~onnxforge.ir.io.deep_copy`); ``bytes`` reads them inline.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.reference: ir.Model = deep_copy(model)
        self._lossy_seen = False

    def __call__(self, record: PassRecord) -> None:
        if self._lossy_seen:
            return
        if not record.lossless:
            self._lossy_seen = True
        elif record.modified:
            self.reference = deep_copy(self.model)

    @property
    def bytes(self) -> bytes:
        return model_to_bytes(self.reference)


def float_ops(report: Report) -> list[dict[str, str]]:
    """``[{pass, node, op_type, reason}]`` for every node a quantization pass left float."""
    rows = []
    for r in report.records:
        if not _is_quantize(r):
            continue
        for s in r.stats.get("skipped") or []:
            rows.append({"pass": r.name, "node": s.get("node", ""), "op_type": s.get("op_type", ""),
                         "reason": s.get("reason", "")})
    return rows


def quantized_nodes(report: Report) -> list[str]:
    names: list[str] = []
    for r in report.records:
        if _is_quantize(r):
            names.extend((r.stats.get("details") or {}).get("quantized_nodes") or [])
    return list(dict.fromkeys(names))


def quant_error(report: Report, float_model: Any, quantized_model: Any,
                data: Iterable[Mapping[str, Any]], *, max_samples: int = 16) -> list[LayerSQNR]:
    """Per-layer SQNR of the quantized nodes the report names ([] when nothing was quantized)."""
    nodes = quantized_nodes(report)
    if not nodes:
        return []
    return layer_sqnr(float_model, quantized_model, data, nodes, max_samples=max_samples)





def rerun(model: Any, pipeline: str, *, calibration: Any = None, seed: int = 0,
          target: str = "cpu") -> tuple[Report, ir.Model, ir.Model]:
    """Run ``pipeline`` on (a fresh load of) ``model`` to get its report and float reference.

    ``tune`` and ``sensitivity`` score many candidates without keeping their reports; the page
    reruns the one it shows. Returns (report, float reference, final model).
    """
    import warnings

    from onnxforge.ir.io import load
    from onnxforge.passes.base import PassContext
    from onnxforge.passes.manager import Pipeline
    from onnxforge.runtime import data as cd

    m = load(model)
    ctx = PassContext(target=target, calibration_data=cd.load(calibration, m) if calibration is not None else None,
                      seed=seed)
    snapshot = FloatSnapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Pipeline(pipeline, context=ctx, on_pass=snapshot).run(m)
    return result.report, snapshot.reference, result.model
__all__ = ["FloatSnapshot", "float_ops", "quant_error", "quantized_nodes", "rerun"]
