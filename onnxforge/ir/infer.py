"""ONNX shape inference on an IR model, without keeping replaced weights alive.

onnx_ir's ``ShapeInferencePass`` (onnx-ir 1.1) runs ``onnx.shape_inference`` through
``_c_api_utils.call_onnx_api``, which appends every initializer to ``graph.inputs`` for the call and
takes them out again. ``GraphInputs`` counts its members in a ``collections.Counter``; taking one out
decrements its count to 0 but leaves the key, so the graph keeps a reference to every initializer
``Value`` that existed at the time, for the graph's lifetime. When a later pass replaces a weight
(``fold-affine`` writes the scaled copy), the old ``Value`` and its ``ExternalTensor`` stay reachable:
the tensor cannot be unmapped, and a 1 GiB model's O1 peak went from 0.33 GB to 1.33 GB (measured
with ``bench/bench_scale.py --sizes 1 --pipelines O1``).

:func:`infer_shapes` runs that pass and then drops the zero-count entries, so only real members are
referenced. Use it instead of calling ``onnx_ir.passes.common.ShapeInferencePass`` directly.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxforge.ir.graph import all_graphs

__all__ = ["forget_removed_io", "infer_shapes"]


def infer_shapes(model: ir.Model, *, check_type: bool = True, strict_mode: bool = True,
                 data_prop: bool = True) -> ir.passes.PassResult:
    """``onnx_ir``'s shape inference pass (in place), then :func:`forget_removed_io`."""
    try:
        return ShapeInferencePass(check_type=check_type, strict_mode=strict_mode, data_prop=data_prop)(model)
    finally:
        forget_removed_io(model)


def forget_removed_io(model: ir.Model) -> int:
    """Drop graph inputs/outputs bookkeeping of values that are no longer inputs/outputs; how many.

    Reads the private ``_ref_counter`` of onnx_ir's graph I/O containers (checked with ``getattr``:
    a later onnx_ir without it makes this a no-op).
    """
    dropped = 0
    for graph in all_graphs(model):
        for container in (graph.inputs, graph.outputs):
            counter = getattr(container, "_ref_counter", None)
            if counter is None:
                continue
            stale = [value for value, count in counter.items() if count <= 0]
            for value in stale:
                del counter[value]
            dropped += len(stale)
    return dropped
