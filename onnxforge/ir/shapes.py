"""Declared shapes are claims, not facts: check them against ONNX shape inference before trusting them.

Exporters leave stale annotations — a ``value_info`` or graph-output shape from before a graph edit,
a static size where the graph input is symbolic, the wrong rank. onnx_ir reads them into
``Value.shape``, and rewrite rules read ``Value.shape`` to decide (a Reshape is a no-op, a Shape
folds to a constant, a MatMul is 2-D). :func:`reconcile_declared_shapes` re-derives every computed
value's shape from the graph inputs and constants alone (``onnx.shape_inference`` with data
propagation, the declared shapes removed first) and, per value:

- inference gave no shape: the declared one stays (nothing contradicts it);
- the ranks differ, or a dim is static in both and differs: the inferred shape replaces it;
- a dim the inference knows — static, or a named symbolic dim of a graph input — replaces a
  declared dim that disagrees; a dim inference only knows as unknown keeps the declared one
  (the exporter may know more than ONNX's inference).

Graph inputs and initializers keep their shapes (they are what the caller feeds and what is stored).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxforge.ir.graph import all_graphs

__all__ = ["reconcile_declared_shapes"]

logger = logging.getLogger(__name__)


def _computed_values(model: ir.Model) -> list[ir.Value]:
    values = []
    for graph in all_graphs(model):
        for node in graph:
            values.extend(v for v in node.outputs if v is not None and v.name)
    return values


def _known(dim) -> bool:
    """A dim inference really knows: an int, or a named symbolic dim it did not invent (``unk__N``)."""
    if isinstance(dim, int):
        return True
    name = getattr(dim, "value", None)
    return bool(name) and not str(name).startswith("unk__")


def _merge(declared: ir.Shape | None, inferred: ir.Shape | None) -> ir.Shape | None:
    if inferred is None:
        return declared
    if declared is None or len(declared) != len(inferred):
        return inferred
    dims = []
    for d, i in zip(declared, inferred):
        dims.append(i if _known(i) and d != i else d)
    return ir.Shape(dims)


def reconcile_declared_shapes(model: ir.Model) -> int:
    """Replace declared shapes that contradict ONNX shape inference (see module docstring).

    Returns the number of values whose declared shape was wrong. When inference fails on the model
    as a whole, every declared shape is kept and 0 is returned (the failure is logged).
    """
    from onnxforge.ir.infer import infer_shapes

    values = _computed_values(model)
    declared = [(v, v.shape) for v in values]
    # Only shapes are taken from the inference: onnx_ir's merge also rewrites types (and gives
    # sequence values tensor types), and graph inputs and initializers must not change at all.
    kept = [(v, v.type, v.shape) for g in all_graphs(model) for v in (*g.inputs, *g.initializers.values())]
    types = [(v, v.type) for v in values]
    for v in values:
        v.shape = None
    try:
        infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # pragma: no cover - the pass itself catches inference errors
        logger.info("shape inference failed (%s): declared shapes kept", e)
    inferred = {id(v): v.shape for v in values}
    for v, type_, shape in kept:
        v.type, v.shape = type_, shape
    for v, type_ in types:
        v.type = type_
    fixed = 0
    for v, shape in declared:
        merged = _merge(shape, inferred[id(v)]) if isinstance(v.type, ir.TensorType) else shape
        if shape is not None and merged != shape:
            fixed += 1
        v.shape = merged
    return fixed
