"""``simplify``: onnxscript's canonicalization rules, applied until none matches.

Exporters leave shape arithmetic and no-op ops behind: ``Reshape(x, Concat(Shape(x)[0], -1))`` where
the other dimensions are static, ``Expand`` to the shape an input already has, ``Cast`` to the same
type, ``Transpose`` with the identity permutation, successive ``Reshape``/``Unsqueeze``, ``Slice`` that
takes everything, optional zero biases. Each rule rewrites a pattern into an equivalent, shorter one:

* no-op removal: ``x + 0``, ``x * 1``, ``x / 1``, ``x - 0``, ``Dropout`` at inference, identity
  Cast/Expand/Transpose/Reshape;
* reshape canonicalization: a Reshape whose target shape is computed from ``Shape`` becomes a constant
  shape when every dimension but one is known (``-1`` takes the rest), Reshape∘Reshape → Reshape,
  the reshape-around-MatMul broadcast idiom → MatMul;
* Slice/Split collapsing, ``Cast(ConstantOfShape)`` → typed ``ConstantOfShape``, redundant ScatterND;
* removal of optional all-zero biases of Conv/ConvTranspose/Gemm.

All are exact in IEEE arithmetic. Lossless. Fusions (BatchNorm, Pad, Relu/Clip, Min/Max) are left to
``fold-batchnorm`` and ``fuse``, so that their counts show where they belong.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules.common import (
    _basic_rules,
    _broadcast_to_matmul,
    _cast_constant_of_shape,
    _collapse_slices,
    _materialize_reshape_shape,
    _no_op,
    _redundant_scatter_nd,
    _remove_optional_bias,
)

from onnxforge.ir.graph import all_nodes, const_value, make_initializer
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.fold import apply_rules
from onnxforge.passes.registry import register_pass

CANONICALIZATION_RULES = (
    *_no_op.rules,
    *_broadcast_to_matmul.rules,
    *_cast_constant_of_shape.rules,
    *_collapse_slices.rules,
    *_materialize_reshape_shape.rules,
    *_basic_rules.basic_optimization_rules(),
    *_redundant_scatter_nd.rules,
    *_remove_optional_bias.rules,
)


@register_pass("simplify")
class SimplifyPass(Pass):
    """Canonicalize exporter idioms (shape arithmetic, no-op ops) with onnxscript's rules. Lossless."""

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        before = sum(1 for _ in all_nodes(model))
        existing_constants = {id(n) for n in model.graph if n.op_type == "Constant"}
        applied = apply_rules(CANONICALIZATION_RULES, model, stats)
        if applied:
            # Rules write their constant shapes as Constant nodes: store them as initializers, like
            # the rest of the weights, and drop the shape arithmetic nobody reads any more.
            _lift_new_constants(model.graph, existing_constants)
            ir.passes.common.RemoveUnusedNodesPass()(model)
            stats.count("nodes_removed", before - sum(1 for _ in all_nodes(model)))
        return applied > 0


def _lift_new_constants(graph: ir.Graph, existing: set[int]) -> None:
    for node in list(graph):
        if node.op_type != "Constant" or id(node) in existing or node.outputs[0].is_graph_output():
            continue
        array = const_value(node.outputs[0])
        if array is None:
            continue
        value = make_initializer(graph, node.outputs[0].name or "simplified", array)
        ir.convenience.replace_all_uses_with(node.outputs[0], value)
        graph.remove(node, safe=True)
