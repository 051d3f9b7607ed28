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

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import RewriteRuleSet
from onnxscript.rewriter.rules import common as rules
from onnxscript.rewriter.rules.common import _materialize_reshape_shape

from onnxforge.ir.graph import all_nodes, const_value, make_initializer
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.fold import apply_rules
from onnxforge.passes.registry import register_pass

class MaterializeReshapeShape(_materialize_reshape_shape.MaterializeReshapeShape):  # same name: same stats key
    """onnxscript's rule writes the Reshape's *declared* output shape as a constant. A declared shape
    is not checked by onnxruntime and can be stale: ddddocr's recognizer declares ``[1, seqlen]`` for
    a ``(T, 1, 8210)`` output, and the rule turned it into a different reshape (a lossless pass that
    changed the output). Materialize only when the computed shape's length is known and equals the
    declared rank, and a fully known input size agrees with the declared dims."""

    def check(self, context, data, shape):
        result = super().check(context, data, shape)
        if not result:
            return result
        declared = list(context.output_values[0].shape)
        if _vector_length(shape) != len(declared):
            return result.fail("the computed shape's length is unknown or differs from the declared rank")
        if data.shape is not None and all(isinstance(d, int) for d in data.shape):
            known = [d for d in declared if isinstance(d, int)]
            total, prod = int(np.prod(list(data.shape))), int(np.prod(known)) if known else 1
            if (len(known) == len(declared) and prod != total) or (prod == 0 or total % prod):
                return result.fail("the declared output shape does not hold the input's elements")
        return result


def _vector_length(value, depth: int = 0) -> int | None:
    """Length of a 1-D int64 shape vector, from its annotation, its constant value, or the Concat /
    Unsqueeze(scalar) / Shape / Gather chain exporters build it with; None when unknown."""
    if value is None or depth > 8:
        return None
    if value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
        return value.shape[0]
    array = const_value(value)
    if array is not None:
        return int(array.size) if array.ndim <= 1 else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Concat":
        parts = [_vector_length(v, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else sum(parts)
    if node.op_type == "Unsqueeze" and node.inputs[0] is not None:
        src = node.inputs[0]
        scalar = (src.shape is not None and len(src.shape) == 0) or (
            src.producer() is not None and src.producer().op_type == "Gather"
            and const_value(src.producer().inputs[1]) is not None
            and const_value(src.producer().inputs[1]).ndim == 0)
        return 1 if scalar else None
    if node.op_type == "Cast":
        return _vector_length(node.inputs[0], depth + 1)
    return None


# onnxscript's canonicalization rules, by their public names (the order of its rule sets).
CANONICALIZATION_RULES = (
    # no-op removal: x * 1 and x + 0 in both operand orders, x - 0, x / 1, inference Dropout
    *RewriteRuleSet([rules.mul_by_1_rule, rules.add_0_rule], commute=True).rules,
    rules.sub_0_rule,
    rules.div_by_1_rule,
    rules.dropout_zero_rule,
    rules.dropout_inference_rule,
    rules.two_reshapes_matmul_reshape_rule,
    rules.one_reshape_matmul_reshape_rule,
    rules.cast_constant_of_shape_rule,
    rules.cast_constant_of_shape_without_value_rule,
    rules.collapse_slice_rule,
    rules.collapse_slice2_rule,
    MaterializeReshapeShape.rule(),
    # onnxscript's basic_optimization_rules()
    rules.cast_cast_rule,
    rules.no_op_cast_rule,
    rules.no_op_expand_rule,
    rules.flatten_to_reshape_rule,
    rules.reshape_reshape_rule,
    rules.slice_split_rule,
    rules.no_op_transpose_rule,
    rules.transpose_transpose_rule,
    rules.unsqueeze_unsqueeze_rule,
    rules.squeeze_reshape_1d_rule,
    rules.no_op_dynamic_scatter_nd_rule,
    rules.no_op_static_scatter_nd_rule,
    rules.remove_optional_bias_from_conv_rule,
    rules.remove_optional_bias_from_conv_transpose_rule,
    rules.remove_optional_bias_from_qlinear_conv_rule,
    rules.remove_optional_bias_from_gemm_rule,
)


@register_pass("simplify")
class SimplifyPass(Pass):
    """Canonicalize exporter idioms (shape arithmetic, no-op ops) with onnxscript's rules. Lossless.

    Rules refuse matches that read an initializer which is also a graph input (``x * 1`` where the 1
    may be fed another value); the shape initializers rules create get names no other value has.
    """

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxforge.ir.shapes import reconcile_declared_shapes

        # The rules read Value.shape (a Reshape to the shape it has is a no-op): not a stale one.
        stale = reconcile_declared_shapes(model)
        if stale:
            stats.count("stale_shapes_corrected", stale)
        before = sum(1 for _ in all_nodes(model))
        existing_constants = {id(n) for n in model.graph if n.op_type == "Constant"}
        applied = apply_rules(CANONICALIZATION_RULES, model, stats)
        if applied:
            # Rules write their constant shapes as Constant nodes: store them as initializers, like
            # the rest of the weights, and drop the shape arithmetic nobody reads any more.
            _lift_new_constants(model.graph, existing_constants)
            _drop_allowzero_before_opset14(model, stats)
            ir.passes.common.RemoveUnusedNodesPass()(model)
            stats.count("nodes_removed", before - sum(1 for _ in all_nodes(model)))
        return applied > 0 or stale > 0


def _drop_allowzero_before_opset14(model: ir.Model, stats: PassStats) -> None:
    """onnxscript's reshape rules write ``Reshape(allowzero=...)``, an attribute that exists only
    from opset 14: onnxruntime refuses it in older models (PaddleOCR-style opset-12 exports).

    Dropping it is lossless when the target shape holds no 0 (then allowzero has no effect) or when
    it is 0 (the old default semantics). A literal 0 with allowzero=1 has no opset-13 spelling: that
    node is reported, and the model's checker at save refuses the result.
    """
    if (model.opset_imports.get("", 0) or 0) >= 14:
        return
    for node in all_nodes(model):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or "allowzero" not in node.attributes:
            continue
        shape = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if node.attributes["allowzero"].as_int() == 0 or (shape is not None and not (shape == 0).any()):
            del node.attributes["allowzero"]
            stats.count("allowzero_dropped_for_old_opset")
        else:
            stats.skip(node, "Reshape(allowzero=1) with a literal 0 cannot be written before opset 14")


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
