"""Transformer fusions: LayerNormalization, GELU, RMSNorm, SkipLayerNorm, rotary embeddings,
multi-head attention, packed-QKV Attention, BiasGelu, EmbedLayerNormalization.

Mostly onnxscript's ``ort_fusions`` (the rules behind ``fuse_xformers``), applied in the order
``fuse_xformers`` uses, plus what they lack for the BERT encoders both torch exporters write:

* ``ShapeOfLinear``: the attention fusion rewrites a ``[1,1,1,S]`` mask into a ``[1,1,S,S]`` bias
  by reading ``Shape(q_projection)``. That extra use of the projection blocks the later bias and
  packed-QKV fusions ("matched nodes have other uses"). ``Shape(MatMul(x, W) [+ b])`` restricted to
  the leading axes equals ``Shape(x)`` on those axes, so we read the shape from ``x`` instead.
* The TorchScript exporter writes ``Add(bias, MatMul)`` where dynamo writes ``Add(MatMul, bias)``;
  onnxscript's bias rules only match the latter, so we apply them with ``commute=True``.
* ``EmbedLayerNormalization`` (onnxscript has no rule for it): token Gather + position embeddings
  (a Gather by position ids, or a constant table) [+ segment Gather] + LayerNormalization, as
  onnxruntime's transformer optimizer fuses it.
* torch's SDPA decomposition as the TorchScript exporter writes it (Hugging Face BERT with an
  ``attention_mask``): q and k each scaled by ``d^-1/4`` and a ``Where(mask, 0, -inf)`` additive
  bias are already matched by onnxscript's SDPA rule; what blocks it is (1) ONNX shape inference
  losing the head count and the mask shape in the exporter's shape arithmetic (fixed by
  :class:`SymbolicShapeInferencePass`), (2) a no-op ``Reshape`` between SDPA and the heads' merge
  (:class:`NoOpReshape`), (3) the NaN guard ``Where(IsNaN(softmax), 0, softmax)``, which onnxscript
  would drop although onnxruntime's fused attention returns NaN for a fully masked row; we move it
  after the fused op instead (:class:`NanGuardPastMatMul`, :class:`NanGuardPastLayout`).
* For target ``onnx``: GELU becomes the standard ``Gelu`` (opset 20), RMSNorm and rotary embedding
  the opset-23 standard ops, LayerNormalization the opset-17 one; nothing else.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import (
    attention,
    bias_gelu,
    cos_sin_cache,
    erfgelu,
    gelu,
    mha,
    mha_bias,
    mha_scale,
    rms_normalization,
    rotary_embedding,
    sdpa,
    sdpa_via_mha,
    skip_normalization,
)
from onnxscript.rewriter.rules.fusion import _layer_norm, _rms_normalization, _rotary_embedding

from onnxforge.ir.graph import const_value
from onnxforge.passes.fuse._rule import ORT_TARGETS, FusionRule, Step, ruleset

logger = logging.getLogger(__name__)

_SQRT_TWO = math.sqrt(2.0)
_SQRT_TWO_OVER_PI = math.sqrt(2.0 / math.pi)


class ShapeOfLinear(pattern.RewriteRuleClassBase):
    """``Shape(MatMul(x, W) [+ b], start, end)`` → ``Shape(x, start, end)`` when the slice excludes
    the last axis (a 2-D ``W`` and 1-D ``b`` keep every other axis of ``x``). Lossless."""

    def __init__(self):
        super().__init__("ShapeOfLinear", remove_nodes=False)

    def pattern(self, op, x, w, b):
        y = pattern.OrValue(
            [op.Add(op.MatMul(x, w), b), op.MatMul(x, w)],
            tag_var="has_bias",
            tag_values=[True, False],
        )
        return op.Shape(y, _allow_other_attributes=True, _outputs=["shape"])

    def check(self, context, x, w, b, shape, has_bias, **_):
        result = pattern.MatchResult()
        if w.shape is None or len(w.shape) != 2:
            return result.fail("weight is not 2-D", w)
        if has_bias and (b.shape is None or len(b.shape) > 1):
            return result.fail("bias is not 1-D", b)
        if x.shape is None:
            return result.fail("input rank unknown", x)
        rank = len(x.shape)
        node = shape.producer()
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        if min(end, rank) > rank - 1 or start >= min(end, rank):
            return result.fail("Shape slice covers the last axis", node)
        return result

    def rewrite(self, op, x, shape, **_):
        return op.Shape(x, **shape.producer().attributes)


def _std_gelu_erf(op, x):
    return op.Gelu(x, approximate="none")


def _std_gelu_tanh(op, x):
    return op.Gelu(x, approximate="tanh")


class _StdGeluTanh(gelu.GeluTanhFusion):
    def rewrite(self, op, x):
        return op.Gelu(x, approximate="tanh")


def _gelu_erf_pattern_3(op, x):
    # torch's TorchScript exporter: (x * (Erf(x / sqrt2) + 1)) * 0.5
    return (x * (op.Erf(x / _SQRT_TWO) + 1.0)) * 0.5


def _gelu_tanh_pattern_2(op, x):
    # HF NewGELU / torch code: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
    inner = op.Mul(_SQRT_TWO_OVER_PI, op.Add(x, op.Mul(0.044715, op.Pow(x, 3.0))))
    return op.Mul(op.Mul(0.5, x), op.Add(1.0, op.Tanh(inner)))


def _contrib_fast_gelu(op, x):
    return op.FastGelu(x, _domain="com.microsoft")


def _contrib_gelu(op, x):
    return op.Gelu(x, _domain="com.microsoft")


class LayerNormFusion(_layer_norm.LayerNormFusion):
    """onnxscript's rule, also matching ``Mul(scale, normalized)`` (``w * x_hat`` in torch code); its
    untagged ``OrValue`` rules out ``RewriteRuleSet(commute=True)``."""

    def __init__(self, name: str, scale_first: bool):
        super().__init__(name)
        self._scale_first = scale_first

    def pattern(self, op, x, scale, epsilon):
        mean = op.ReduceMean(x, [-1], keepdims=1)
        deviation = op.Sub(x, mean)
        deviation_squared = pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, 2)])
        variance = op.ReduceMean(deviation_squared, [-1], keepdims=1)
        std_dev = op.Sqrt(op.Add(variance, epsilon))
        normalized = pattern.OrValue(
            [op.Mul(deviation, op.Reciprocal(std_dev)), op.Div(deviation, std_dev)]
        )
        return op.Mul(scale, normalized) if self._scale_first else op.Mul(normalized, scale)


class LayerNormBiasFusion(_layer_norm.LayerNormBiasFusion):
    def __init__(self, name: str, bias_first: bool):
        super().__init__(name)
        self._bias_first = bias_first

    def pattern(self, op, x, scale, bias):
        normalized = op.LayerNormalization(x, scale, _outputs=["normalized"])
        return op.Add(bias, normalized) if self._bias_first else op.Add(normalized, bias)


def _layer_norm_steps(target: str, opset: int) -> Sequence[Step] | str:
    if opset < 17:
        return f"LayerNormalization needs opset 17, model has {opset}"
    return [
        Step(ruleset(LayerNormFusion.rule("LayerNorm", False), LayerNormFusion.rule("LayerNormScaleFirst", True))),
        Step(
            ruleset(LayerNormBiasFusion.rule("LayerNormBias", False), LayerNormBiasFusion.rule("LayerNormBiasFirst", True)),
            counted=False,
        ),
    ]


def _gelu_steps(target: str, opset: int) -> Sequence[Step] | str:
    patterns = (erfgelu.erf_gelu_pattern_1, erfgelu.erf_gelu_pattern_2, _gelu_erf_pattern_3)
    if target == "onnx":
        if opset < 20:
            return f"standard Gelu needs opset 20, model has {opset}"
        rules = [pattern.RewriteRule(p, _std_gelu_erf, name="Gelu") for p in patterns]
        tanh2 = pattern.RewriteRule(_gelu_tanh_pattern_2, _std_gelu_tanh, name="GeluTanh2")
        return [Step(ruleset(*rules, _StdGeluTanh.rule("GeluTanh"))), Step(ruleset(tanh2, commute=True))]
    rules = [pattern.RewriteRule(p, _contrib_gelu, name="Gelu") for p in patterns]
    return [Step(ruleset(*rules))]


def _fast_gelu_steps(target: str, opset: int) -> Sequence[Step] | str:
    tanh2 = pattern.RewriteRule(_gelu_tanh_pattern_2, _contrib_fast_gelu, name="FastGelu2")
    return [Step(ruleset(gelu.GeluTanhFusion.rule())), Step(ruleset(tanh2, commute=True))]


class ReciprocalFromDiv(pattern.RewriteRuleClassBase):
    """``Div(1, x)`` → ``Reciprocal(x)``: TorchScript writes ``torch.rsqrt`` as ``1 / Sqrt(.)``, the RMSNorm
    pattern reads ``Reciprocal(Sqrt(.))``. Lossless: both compute the IEEE quotient ``1 / x``."""

    def pattern(self, op, one, x):
        return op.Div(one, x)

    def check(self, context, one, x, **_):
        result = pattern.MatchResult()
        value = one.const_value
        if value is None or value.numpy().size != 1 or float(value.numpy().ravel()[0]) != 1.0:
            return result.fail("the numerator is not the constant 1", one)
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16):
            return result.fail("not a float division", x)
        if one.shape is not None and one.shape.rank() > 0 and (x.shape is None or x.shape.rank() < one.shape.rank()):
            return result.fail("the constant 1 would broadcast x to a higher rank", one)
        return result

    def rewrite(self, op, x, **_):
        return op.Reciprocal(x)


class ReduceMeanExplicitDefaults(pattern.RewriteRuleClassBase):
    """``ReduceMean(x, axes)`` (opset ≥ 18) with its attributes written out: ``keepdims`` (default 1)
    and ``noop_with_empty_axes`` (default 0). TorchScript leaves the latter implicit and onnxscript's
    RMSNorm pattern matches it by value. Lossless: the same op with the same attribute values."""

    def pattern(self, op, x, axes):
        return op.ReduceMean(x, axes, _allow_other_attributes=True, _outputs=["mean"])

    def check(self, context, mean, **_):
        result = pattern.MatchResult()
        attrs = mean.producer().attributes
        if "noop_with_empty_axes" in attrs and "keepdims" in attrs:
            return result.fail("attributes already explicit")
        return result

    def rewrite(self, op, x, axes, mean, **_):
        attrs = mean.producer().attributes
        keepdims = attrs["keepdims"].as_int() if "keepdims" in attrs else 1
        noop = attrs["noop_with_empty_axes"].as_int() if "noop_with_empty_axes" in attrs else 0
        return op.ReduceMean(x, axes, keepdims=keepdims, noop_with_empty_axes=noop)


def _rms_steps(target: str, opset: int) -> Sequence[Step] | str:
    # TorchScript's spelling of the same math first: 1 / Sqrt(.) and implicit ReduceMean defaults
    canonical = Step(ruleset(ReciprocalFromDiv.rule(), ReduceMeanExplicitDefaults.rule()), counted=False)
    if target == "onnx":
        if opset < 23:
            return f"standard RMSNormalization needs opset 23, model has {opset}"
        return [canonical, Step(_rms_normalization.rms_normalization_ruleset)]
    return [canonical, Step(rms_normalization.rms_normalization_ruleset)]


class SkipLayerNormFusion(skip_normalization.SkipLayerNormFusion):
    """onnxscript's rule, with the pre-added bias in either operand order (``RewriteRuleSet(commute=
    True)`` cannot be used: it fails on the rule's untagged ``OrValue``).

    The pre-added bias order is a rule parameter (``bias_first``), not an ``OrValue``: both operands
    are plain variables, so ``OrValue([Add(input, bias), Add(bias, input)])`` always takes the first
    alternative, binds the 1-D bias as ``input`` on the TorchScript exporter's ``Add(bias, MatMul)``,
    fails the shape check without trying the other order, and the bias-less rule then fuses the
    LayerNorm leaving the bias ``Add`` outside."""

    def __init__(self, name: str, has_bias: bool = False, bias_pre_add: bool = False, bias_first: bool = False):
        super().__init__(name, has_bias=has_bias, bias_pre_add=bias_pre_add)
        self._bias_first = bias_first

    def pattern(self, op, input, skip, gamma, beta, bias):
        if self._has_bias and self._bias_pre_add:
            input = op.Add(bias, input) if self._bias_first else op.Add(input, bias)
        skip_sum = pattern.OrValue([op.Add(skip, input), op.Add(input, skip)], name="skip_sum")
        if self._has_bias and not self._bias_pre_add:
            skip_sum = pattern.OrValue([op.Add(skip_sum, bias), op.Add(bias, skip_sum)])
        normalized = op.LayerNormalization(
            skip_sum, gamma, beta, axis=-1, _allow_other_attributes=True, _outputs=["layer_norm"]
        )
        return normalized, skip_sum


class SkipRmsNormFusion(skip_normalization.SkipRmsNormFusion):
    """onnxscript's SkipSimplifiedLayerNormalization rule with the pre-added bias in either operand
    order — the same fix as :class:`SkipLayerNormFusion` (TorchScript writes ``Add(bias, MatMul)``)."""

    def __init__(self, name: str, has_bias: bool = False, bias_pre_add: bool = False, bias_first: bool = False):
        super().__init__(name, has_bias=has_bias, bias_pre_add=bias_pre_add)
        self._bias_first = bias_first

    def pattern(self, op, input, skip, gamma, bias, epsilon, stash_type):
        if self._has_bias and self._bias_pre_add:
            input = op.Add(bias, input) if self._bias_first else op.Add(input, bias)
        skip_sum = pattern.OrValue([op.Add(skip, input), op.Add(input, skip)], name="skip_sum")
        if self._has_bias and not self._bias_pre_add:
            skip_sum = op.Add(skip_sum, bias)
        normalized = op.SimplifiedLayerNormalization(
            skip_sum, gamma, axis=-1, _allow_other_attributes=True, _outputs=["simplified_layer_norm"]
        )
        return normalized, skip_sum


class ResidualSum(pattern.RewriteRuleClassBase):
    """``LayerNormalization(a + b)`` → ``LayerNormalization(Sum(a, b))`` for a residual sum of two
    computed tensors, and ``LayerNormalization((x + bias) + skip)`` → ``LayerNormalization(Sum(x,
    bias, skip))`` when the projection's bias is added just before (one kernel pass instead of two),
    on target ``cpu``.

    Why: onnxruntime's session optimizer (``SkipLayerNormFusion``, level EXTENDED) rewrites
    ``Add`` + ``LayerNormalization`` into ``com.microsoft.SkipLayerNormalization``, and its CPU kernel
    is slower than the two ops it replaces — 1.2× to 7× on [batch, 128, 64 | 768] in onnxruntime 1.30
    (Intel Xeon, AVX-512) and 1.32 (AMD EPYC, AVX2); ``bench/bench_skiplayernorm.py`` measures it.
    ``Sum`` is the same elementwise addition (with the same broadcasting) and is not what that fusion
    matches, so the faster kernels stay. Lossless: ``Sum(x, bias, skip)`` adds in the order the graph
    did, ``(x + bias) + skip``.

    Left alone: a residual operand that is a constant, and embedding sums (an operand from ``Gather``,
    which ``EmbedLayerNormalization`` and onnxruntime's own embedding fusion handle).
    """

    def __init__(self, with_bias: bool, norm: str = "LayerNormalization"):
        super().__init__(f"ResidualSum{'Bias' if with_bias else ''}_{norm}")
        self._with_bias = with_bias
        self._norm = norm

    def pattern(self, op, x, bias, skip):
        first = op.Add(x, bias, _outputs=["first"]) if self._with_bias else x
        total = op.Add(first, skip, _outputs=["total"])
        return getattr(op, self._norm)(total, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["ln"])

    def check(self, context, x, skip, bias=None, **_):
        result = pattern.MatchResult()
        if self._with_bias and const_value(bias) is None:
            return result.fail("the inner Add is not a constant bias", bias)
        for operand in (x, skip):
            if const_value(operand) is not None:
                return result.fail("an operand is a constant (a bias add, not a residual)", operand)
            producer = operand.producer()
            if producer is not None and producer.op_type == "Gather":
                return result.fail("an embedding sum (left to EmbedLayerNormalization)", operand)
        return result

    def rewrite(self, op, x, skip, ln, bias=None, **_):
        node = ln.producer()
        terms = (x, bias, skip) if self._with_bias else (x, skip)
        return getattr(op, self._norm)(op.Sum(*terms), *node.inputs[1:], **node.attributes)


def _residual_sum_steps(target: str, opset: int) -> Sequence[Step] | str:
    if target != "cpu":
        return "only for onnxruntime CPU, whose Skip(Simplified)LayerNormalization kernels are the slow ones measured"
    # LayerNorm and RMSNorm (onnxruntime's SimplifiedLayerNormalization); with the bias first,
    # otherwise the plain rule would take the outer Add alone
    norms = ("LayerNormalization", "SimplifiedLayerNormalization")
    return [
        Step(ruleset(*(ResidualSum.rule(with_bias=True, norm=n) for n in norms), commute=True)),
        Step(ruleset(*(ResidualSum.rule(with_bias=False, norm=n) for n in norms))),
    ]


_SKIP_LN_SLOW_ON_CPU = (
    "onnxruntime's CPU SkipLayerNormalization kernel is 1.2-7x slower than Add + LayerNormalization "
    "(bench/bench_skiplayernorm.py); ResidualSum keeps the two ops instead"
)


def _skip_ln_steps(target: str, opset: int) -> Sequence[Step] | str:
    return [
        Step(
            ruleset(
                SkipLayerNormFusion.rule("SkipLayerNormPreBias", has_bias=True, bias_pre_add=True),
                SkipLayerNormFusion.rule(
                    "SkipLayerNormPreBiasFirst", has_bias=True, bias_pre_add=True, bias_first=True
                ),
                SkipLayerNormFusion.rule("SkipLayerNormBias", has_bias=True, bias_pre_add=False),
                SkipLayerNormFusion.rule("SkipLayerNorm", has_bias=False),
            )
        )
    ]


def _skip_rms_steps(target: str, opset: int) -> Sequence[Step] | str:
    return [
        Step(
            ruleset(
                SkipRmsNormFusion.rule("SkipRmsNormPreBias", has_bias=True, bias_pre_add=True),
                SkipRmsNormFusion.rule("SkipRmsNormPreBiasFirst", has_bias=True, bias_pre_add=True, bias_first=True),
                SkipRmsNormFusion.rule("SkipRmsNormBias", has_bias=True, bias_pre_add=False),
                SkipRmsNormFusion.rule("SkipRmsNorm", has_bias=False),
            )
        )
    ]


def _rotary_steps(target: str, opset: int) -> Sequence[Step] | str:
    if target == "onnx":
        if opset < 23:
            return f"standard RotaryEmbedding needs opset 23, model has {opset}"
        return [
            Step(_rotary_embedding.rotary_embedding_rules),
            Step(_rotary_embedding.partial_embedding_rules),
        ]
    return [
        Step(rotary_embedding.rotary_embedding_rules),
        Step(cos_sin_cache.cos_sin_cache_rules, counted=False),
        Step(rotary_embedding.partial_embedding_rules),
    ]


def _single_zero(value: ir.Value, like: ir.Value) -> str | None:
    """Why ``value`` is not a one-element zero constant that broadcasts into ``like`` unchanged."""
    const = value.const_value
    if const is None:
        return "replacement is not a constant"
    array = const.numpy()
    if array.size != 1 or array.item() != 0:
        return "replacement is not a single zero"
    if like.shape is None or len(like.shape) < array.ndim:
        return "cannot prove the zero constant does not widen the output"
    return None


class NanGuardPastMatMul(pattern.RewriteRuleClassBase):
    """``MatMul(Where(IsNaN(P), 0, P), V)`` with ``P = Softmax(S, axis=-1)`` →
    ``Where(IsNaN(Y), 0, Y)`` with ``Y = MatMul(P, V)``: the NaN guard of torch's SDPA
    decomposition (``_safe_softmax``), moved from the probabilities to the attention output.

    Why: onnxscript's SDPA rule matches the guard and drops it, which is not lossless. A softmax
    row is NaN throughout or nowhere (one ``-inf - -inf`` or NaN poisons the row's max and sum), and
    it is NaN exactly when every key of the row is masked by ``-inf`` (a padding mask whose sequence
    is all padding) or the scores hold NaN/+inf. The guard turns such a row into zeros, so that
    query's output is ``0·V = 0``; onnxruntime's fused attention returns NaN there (checked in
    tests/test_fuse_hf_bert.py). Moved past the MatMul, the guard keeps that result:

    * P row all NaN → ``Y`` row = NaN·V = NaN → guarded to 0 = the original ``0·V``;
    * P row NaN-free → ``Y`` row unchanged (NaN-free when ``V`` is finite).

    Exact when ``V`` is finite; if ``V`` holds NaN/inf, rows where the original yields NaN become 0.
    The guard then commutes through the heads' Transpose/Reshape (:class:`NanGuardPastLayout`) so
    the unguarded SDPA/MultiHeadAttention/Attention fusions match, and stays after the fused op.
    The new guard uses a scalar zero (the exporter's ``[1]``-shaped ``[0.]`` broadcasts the same).
    """

    def __init__(self):
        super().__init__("NanGuardPastMatMul")

    def pattern(self, op, p, zero, v):
        return op.MatMul(op.Where(op.IsNaN(p), zero, p), v)

    def check(self, context, p, zero, v, **_):
        result = pattern.MatchResult()
        softmax = p.producer()
        if softmax is None or softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
            return result.fail("guarded value is not a Softmax output", p)
        if (reason := _single_zero(zero, p)) is not None:
            return result.fail(reason, zero)
        axis = softmax.attributes.get_int("axis", -1)
        rank = len(p.shape)
        if axis not in (-1, rank - 1):
            return result.fail("Softmax is not over the last axis (the MatMul's reduction axis)", p)
        return result

    def rewrite(self, op, v, p, zero, **_):
        y = op.MatMul(p, v)
        scalar = op.Constant(value=ir.tensor(zero.const_value.numpy().reshape(())))
        return op.Where(op.IsNaN(y), scalar, y)


class NanGuardPastLayout(pattern.RewriteRuleClassBase):
    """``Transpose|Reshape(Where(IsNaN(x), 0, x))`` → ``Where(IsNaN(y), 0, y)`` with
    ``y = Transpose|Reshape(x)``: an element-wise map commutes with ops that only move elements.
    Exact (bit-identical). Moves the attention NaN guard past the heads' merge so onnxscript's
    MultiHeadAttention pattern (SDPA → Transpose → Reshape) sees no op in between."""

    def __init__(self, name: str, op_type: str):
        super().__init__(name)
        self._op_type = op_type

    def pattern(self, op, x, zero, shape):
        guarded = op.Where(op.IsNaN(x), zero, x)
        if self._op_type == "Transpose":
            return op.Transpose(guarded, _allow_other_attributes=True, _outputs=["moved"])
        return op.Reshape(guarded, shape, _allow_other_attributes=True, _outputs=["moved"])

    def check(self, context, x, zero, **_):
        result = pattern.MatchResult()
        const = zero.const_value
        if const is None or const.numpy().ndim != 0 or const.numpy().item() != 0:
            return result.fail("replacement is not a scalar zero", zero)
        return result

    def rewrite(self, op, x, zero, shape, moved, **_):
        node = moved.producer()
        inputs = [x] if self._op_type == "Transpose" else [x, shape]
        y = getattr(op, self._op_type)(*inputs, **node.attributes)
        return op.Where(op.IsNaN(y), zero, y)


class NoOpReshape(pattern.RewriteRuleClassBase):
    """``Reshape(x, shape)`` → ``x`` when the output's shape provably equals ``x``'s.

    torch's TorchScript exporter reshapes the SDPA result ``[B, H, S, d]`` to ``[B, -1, S, d]``
    before the heads are merged; that Reshape sits between onnxscript's SDPA op and the Transpose
    its MultiHeadAttention pattern expects. A Reshape keeps the elements in row-major order, so
    when input and output shapes are equal dim by dim (known integers, or the same symbolic name
    on both sides) it is the identity. Lossless. Both shapes must be fully known: a dim without a
    name proves nothing.
    """

    def __init__(self):
        super().__init__("NoOpReshape")

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, x, shape, y, **_):
        result = pattern.MatchResult()
        if x.shape is None or y.shape is None:
            return result.fail("input or output shape unknown", y)
        if len(x.shape) != len(y.shape):
            return result.fail("rank changes", y)
        for a, b in zip(x.shape, y.shape):
            if not _is_int(a) and (a.value is None or not _is_int(b) and b.value is None):
                return result.fail("a dim has no name: equality cannot be proved", y)
            if a != b:
                return result.fail(f"dims differ ({a} vs {b})", y)
        return result

    def rewrite(self, op, x, **_):
        return x


class SymbolicShapeInferencePass(ir.passes.InPlacePass):
    """Annotate value shapes with onnxruntime's symbolic shape inference (the analysis
    onnxruntime's own transformer optimizer runs before its fusions). Changes no node. Run as a
    helper step before the attention rules (a :class:`~._rule.Step` may hold a pass).

    Why: onnxscript's SDPA/MHA rules prove head counts and mask shapes by comparing symbolic dims.
    ONNX shape inference gives up on the TorchScript exporter's dynamic shape arithmetic
    (``Reshape(x, Concat(B, S, -1, d))`` for heads, the Range/Gather/Expand chain of Hugging Face's
    padding mask) and writes a fresh ``unk__N`` for each such dim, so no check can pass. The
    symbolic analysis carries ``batch``/``seq`` through that arithmetic (``-1`` → ``64/16 = 4``,
    mask → ``[batch, 1, seq, seq]``).

    Soundness: known integer dims are never changed (a value whose inferred shape contradicts
    one is left as it was); only unknown dims get names. onnxruntime's analysis runs with
    ``auto_merge`` (as its optimizer does): where two different symbolic dims meet in a broadcast
    it assumes them equal rather than one of them being 1 (merges are logged at INFO; on the HF
    BERT graph the only one is ``Min(128, seq) = seq``, the position-id slice, which holds for
    every sequence the model accepts). If such an assumption were false for some model, a rule
    reading the shapes could be wrong: :class:`NoOpReshape` could drop a Reshape that changes the
    shape (later ops would then see wrong shapes and most likely fail at run time), or an
    attention bias broadcast along the query axis could be passed as a full one (onnxruntime
    checks the bias shape when the op runs). The fused outputs are compared with the original
    ones in tests/test_fuse_hf_bert.py at two sequence lengths.
    """

    # weights are passed to the analysis as typed graph inputs, not data, above this many elements
    _MAX_CONST_ELEMENTS = 1024

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not any(node.op_type == "Softmax" for node in model.graph):
            return ir.passes.PassResult(model, False)  # no attention to fuse: skip the analysis
        try:
            from onnxruntime.tools import symbolic_shape_infer as ssi
        except ImportError:  # pragma: no cover - onnxruntime is a core dependency
            logger.info("fuse: onnxruntime symbolic shape inference unavailable; skipped")
            return ir.passes.PassResult(model, False)
        proto = ir.to_proto(model)
        del proto.graph.value_info[:]  # infer from scratch: no stale unk__N names
        for init in list(proto.graph.initializer):
            if np.prod(init.dims, dtype=np.int64) > self._MAX_CONST_ELEMENTS:
                proto.graph.initializer.remove(init)
                if not any(i.name == init.name for i in proto.graph.input):
                    proto.graph.input.append(
                        ssi.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                    )
        try:
            # SymbolicShapeInference.infer_shapes's own loop, without its dump of a temporary
            # model into the working directory when inference is incomplete
            inference = ssi.SymbolicShapeInference(2**31 - 1, True, False, 0)
            inference._preprocess(proto)
            while inference.run_:
                inference._infer_impl()
            inference._update_output_from_vi()
            inferred = inference.out_mp_
        except Exception as e:  # noqa: BLE001 - an analysis failure only means fewer fusions
            logger.info("fuse: symbolic shape inference failed (%s); shapes left as they are", e)
            return ir.passes.PassResult(model, False)
        if inference.suggested_merge_:
            logger.info("fuse: symbolic shape inference assumed equal: %s", inference.suggested_merge_)
        shapes, shapes_dtype = {}, {}
        for info in [*inferred.graph.value_info, *inferred.graph.output]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
                shapes[info.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in info.type.tensor_type.shape.dim
                ]
                shapes_dtype[info.name] = info.type.tensor_type.elem_type
        modified = False
        for node in model.graph:
            for value in node.outputs:
                new = shapes.get(value.name)
                if new is None or None in new:
                    continue
                old = value.shape
                if old is not None:
                    if len(old) != len(new) or any(
                        _is_int(a) and a != b for a, b in zip(old, new)
                    ):
                        continue  # contradicts a known dim: keep ours
                if value.shape != ir.Shape(new):
                    value.shape = ir.Shape(new)
                    modified = True
                if value.dtype is None and shapes_dtype.get(value.name):
                    value.dtype = ir.DataType(shapes_dtype[value.name])
        return ir.passes.PassResult(model, modified)


_guard_past_layout = ruleset(
    NanGuardPastLayout.rule("NanGuardPastTranspose", "Transpose"),
    NanGuardPastLayout.rule("NanGuardPastReshape", "Reshape"),
)


def _mha_steps(target: str, opset: int) -> Sequence[Step] | str:
    # SDPA is onnxscript's intermediate op (domain ai.onnxruntime._fusion); every SDPA not turned
    # into MultiHeadAttention by the mha rules is lowered to it by sdpa_via_mha, so none survives.
    return [
        Step(SymbolicShapeInferencePass(), counted=False),
        # before anything runs ONNX shape inference again (it knows no SDPA op and would drop the
        # symbolic shapes NoOpReshape reads)
        Step(ruleset(NanGuardPastMatMul.rule()), counted=False),
        Step(ruleset(NoOpReshape.rule()), counted=False),
        # the Shape/Gather/Concat chains that fed the removed Reshapes would count as other uses
        Step(common_passes.RemoveUnusedNodesPass(), counted=False),
        Step(_guard_past_layout, counted=False),
        Step(_guard_past_layout, counted=False),  # Transpose, then the Reshape after it
        Step(sdpa.sdpa_rules, counted=False, shape_inference=True),
        Step(mha.mha_rules_with_past),
        Step(mha.mha_rules_no_past),
        Step(ruleset(*mha_scale._mha_scale_rules.rules), counted=False),
        Step(ruleset(ShapeOfLinear.rule(), commute=True), counted=False),
        Step(ruleset(*mha_bias.mha_bias_rules.rules, commute=True), counted=False),
        Step(sdpa_via_mha._rules),
    ]


def _attention_steps(target: str, opset: int) -> Sequence[Step] | str:
    if target == "tensorrt":
        return "TensorRT builds its own attention kernels; packed-QKV Attention is left to it"
    return [Step(attention.attention_rules)]


def _bias_gelu_steps(target: str, opset: int) -> Sequence[Step] | str:
    return [Step(ruleset(*bias_gelu.bias_gelu_rules.rules))]


def _is_int(dim) -> bool:
    return isinstance(dim, int)


def _differ(a, b) -> bool:
    """Two dims provably differ (both known integers and unequal)."""
    return _is_int(a) and _is_int(b) and a != b


class EmbedLayerNormFusion(pattern.RewriteRuleClassBase):
    """``LayerNormalization(Gather(W, ids) + pos [+ Gather(T, seg)], γ, β)`` →
    ``com.microsoft.EmbedLayerNormalization(ids, seg, W, P, T, γ, β, mask="", position_ids)``.

    ``pos`` is either ``Gather(P, position_ids)`` (position ids, ``[S]``, ``[1, S]`` or ``[B, S]``,
    passed to the op, so any positions work, not only ``0..S-1``) or a constant ``[S, H]`` /
    ``[1, S, H]`` table (positions ``0..S-1``, the op's default when ``position_ids`` is absent).
    The op sums the three lookups and layer-normalizes: the same math, lossless up to fp32 rounding.
    Ids are cast to int32 (the op's only index type). ``segment``: where the segment lookup is added
    (``None``; ``"inner"``: ``(word + seg) + pos`` as Hugging Face's BERT; ``"outer"``:
    ``(word + pos) + seg``). Add operand order is handled by ``RewriteRuleSet(commute=True)``.
    """

    def __init__(self, name: str, positions: str, segment: str | None):
        super().__init__(name)
        self._positions = positions
        self._segment = segment

    def pattern(self, op, input_ids, word_emb, position_ids, pos_emb, segment_ids, seg_emb, gamma, beta):
        word = op.Gather(word_emb, input_ids, _allow_other_attributes=True, _outputs=["word"])
        if self._positions == "gather":
            pos = op.Gather(pos_emb, position_ids, _allow_other_attributes=True, _outputs=["pos"])
        else:
            pos = pos_emb
        if self._segment is None:
            total = op.Add(word, pos)
        else:
            seg = op.Gather(seg_emb, segment_ids, _allow_other_attributes=True, _outputs=["seg"])
            total = op.Add(op.Add(word, seg), pos) if self._segment == "inner" else op.Add(op.Add(word, pos), seg)
        return op.LayerNormalization(total, gamma, beta, _allow_other_attributes=True, _outputs=["ln"])

    def check(self, context, input_ids, word_emb, position_ids, pos_emb, segment_ids, seg_emb, gamma,
              beta, ln, word, **kw):
        result = pattern.MatchResult()
        node = ln.producer()
        out_shape = ln.shape
        if out_shape is None or len(out_shape) != 3:
            return result.fail("LayerNormalization output is not known to be 3-D", ln)
        if node.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("LayerNormalization is not over the last axis", node)
        if node.attributes.get_int("stash_type", 1) != 1:
            return result.fail("LayerNormalization stash_type is not float32", node)
        hidden = out_shape[2]
        for name, gather in (("word", word), ("pos", kw.get("pos")), ("seg", kw.get("seg"))):
            if gather is not None and gather.producer().attributes.get_int("axis", 0) != 0:
                return result.fail(f"{name} Gather is not along axis 0", gather.producer())
        tables = [("word_embedding", word_emb), ("position_embedding", pos_emb)]
        if self._segment:
            tables.append(("segment_embedding", seg_emb))
        for name, table in tables:
            if table.const_value is None:
                return result.fail(f"{name} is not a constant", table)
            if table.dtype != ir.DataType.FLOAT:
                return result.fail(f"{name} is not float32", table)
        for name, table in tables:
            if self._positions == "const" and name == "position_embedding":
                continue
            if table.shape is None or len(table.shape) != 2 or table.shape[1] != hidden:
                return result.fail(f"{name} is not a [rows, {hidden}] table", table)
        for name, v in (("gamma", gamma), ("beta", beta)):
            if v.shape is None or list(v.shape) != [hidden]:
                return result.fail(f"{name} is not 1-D of the hidden size", v)
        # The op takes batch and sequence from input_ids, so they must be the full [B, S] of the
        # output, not a broadcast [1, S] (with commuted Adds the matcher also tries the position
        # Gather in the word role). The TorchScript exporter's shapes often carry fresh unknown dims
        # (unk__N); then we rely on user-fed token ids being a graph input.
        ids_shape = input_ids.shape
        if ids_shape is None or len(ids_shape) != 2:
            return result.fail(f"input_ids shape {ids_shape} is not 2-D", input_ids)
        if ids_shape[0] != out_shape[0]:
            if _is_int(ids_shape[0]) and ids_shape[0] == 1:
                return result.fail("input_ids broadcast along the batch (roles swapped?)", input_ids)
            if not input_ids.is_graph_input():
                return result.fail(
                    f"cannot prove input_ids {ids_shape} spans the output's batch {out_shape}", input_ids
                )
        if self._segment:
            s_shape = segment_ids.shape
            if s_shape is None or len(s_shape) != 2 or _differ(s_shape[0], ids_shape[0]) or _differ(s_shape[1], ids_shape[1]):
                return result.fail(f"segment ids shape {s_shape} differs from input_ids {ids_shape}", segment_ids)
            if seg_emb.shape[0] > word_emb.shape[0]:
                return result.fail("segment table is larger than the word table (roles swapped)", seg_emb)
        # onnxruntime checks position and segment id shapes against input_ids at run time; here we
        # refuse only what is provably a broadcast the op cannot express.
        if self._positions == "gather":
            p_shape = position_ids.shape
            if p_shape is None or len(p_shape) not in (1, 2):
                return result.fail(f"position ids shape {p_shape} is not [S], [1, S] or [B, S]", position_ids)
            if len(p_shape) == 2 and _is_int(p_shape[0]) and p_shape[0] != 1 and _differ(p_shape[0], ids_shape[0]):
                return result.fail(f"position ids shape {p_shape} is not [1, S] or [B, S]", position_ids)
            if _is_int(p_shape[-1]) and p_shape[-1] == 1 and ids_shape[1] != 1:
                return result.fail("position ids broadcast along the sequence", position_ids)
        else:
            p = pos_emb.shape
            if p is None or not (len(p) == 2 or (len(p) == 3 and p[0] == 1)) or p[-1] != hidden:
                return result.fail(f"constant position table shape {p} is not [S, H] or [1, S, H]", pos_emb)
            if isinstance(ids_shape[1], int) and ids_shape[1] != p[-2]:
                return result.fail("constant position table length differs from the sequence", pos_emb)
        return result

    def rewrite(self, op, input_ids, word_emb, position_ids, pos_emb, segment_ids, seg_emb, gamma, beta,
                ln, **_):
        def int32(v):
            return v if v.dtype == ir.DataType.INT32 else op.Cast(v, to=ir.DataType.INT32)

        if self._positions == "const":
            table = pos_emb.const_value.numpy()
            pos_emb = op.initializer(
                ir.tensor(np.ascontiguousarray(table.reshape(table.shape[-2], table.shape[-1]))),
                name=f"{pos_emb.name}/2d",
            )
        inputs = [
            int32(input_ids),
            int32(segment_ids) if self._segment else None,
            word_emb,
            pos_emb,
            seg_emb if self._segment else None,
            gamma,
            beta,
        ]
        if self._positions == "gather":
            ids = position_ids if len(position_ids.shape) == 2 else op.Unsqueeze(position_ids, op.Constant(value_ints=[0]))
            inputs += [None, int32(ids)]
        eps = ln.producer().attributes.get_float("epsilon", 1e-5)
        # onnxruntime's shape inference for this op writes output 1 (mask_index) unconditionally:
        # the node must declare it even though nothing reads it.
        out, _mask_index = op.EmbedLayerNormalization(
            *inputs, epsilon=eps, _domain="com.microsoft", _outputs=2
        )
        return out


def _embed_ln_steps(target: str, opset: int) -> Sequence[Step] | str:
    rules = [
        EmbedLayerNormFusion.rule(f"EmbedLayerNorm-{pos}-{seg or 'noseg'}", positions=pos, segment=seg)
        for seg in ("inner", "outer", None)
        for pos in ("gather", "const")
    ]
    return [Step(ruleset(*rules, commute=True))]


RULES: list[FusionRule] = [
    FusionRule(
        "LayerNormalization",
        "transformer",
        "ReduceMean/Sub/Pow/Sqrt/Div(+Mul,+Add) → LayerNormalization (opset 17)",
        _layer_norm_steps,
    ),
    FusionRule(
        "Gelu",
        "transformer",
        "x·½(1+erf(x/√2)) → Gelu (contrib, or standard Gelu opset 20 for target onnx)",
        _gelu_steps,
    ),
    FusionRule(
        "FastGelu",
        "transformer",
        "tanh GELU approximation → com.microsoft.FastGelu",
        _fast_gelu_steps,
        targets=ORT_TARGETS,
    ),
    FusionRule(
        "RMSNormalization",
        "transformer",
        "x/√(mean(x²)+ε)·γ → SimplifiedLayerNormalization (or RMSNormalization opset 23)",
        _rms_steps,
    ),
    FusionRule(
        "EmbedLayerNormalization",
        "transformer",
        "LayerNormalization(Gather(W, ids) + positions [+ Gather(T, seg)]) → com.microsoft.EmbedLayerNormalization",
        _embed_ln_steps,
        targets=ORT_TARGETS,
    ),
    FusionRule(
        "SkipLayerNormalization",
        "transformer",
        "LayerNormalization(x + skip [+ bias]) → com.microsoft.SkipLayerNormalization (not by default on cpu)",
        _skip_ln_steps,
        targets=ORT_TARGETS,
        not_default_on=frozenset({"cpu"}),
        not_default_why=_SKIP_LN_SLOW_ON_CPU,
    ),
    FusionRule(
        "SkipSimplifiedLayerNormalization",
        "transformer",
        "RMSNorm(x + skip [+ bias]) → com.microsoft.SkipSimplifiedLayerNormalization (not by default on cpu)",
        _skip_rms_steps,
        targets=ORT_TARGETS,
        not_default_on=frozenset({"cpu"}),
        not_default_why=(
            "onnxruntime's CPU SkipSimplifiedLayerNormalization kernel is 1.1-2x slower than Add + "
            "SimplifiedLayerNormalization for a bias-free residual at hidden 768 (mixed with a bias or at "
            "hidden 64; bench/bench_skiplayernorm.py); ResidualSum keeps the two ops"
        ),
    ),
    FusionRule(
        "RotaryEmbedding",
        "transformer",
        "rotate-half rotary embedding → RotaryEmbedding (contrib, or opset 23)",
        _rotary_steps,
    ),
    FusionRule(
        "MultiHeadAttention",
        "transformer",
        "q/k/v reshape-transpose, QKᵀ·scale(+mask), Softmax, ·V → com.microsoft.MultiHeadAttention",
        _mha_steps,
        targets=ORT_TARGETS,
    ),
    FusionRule(
        "Attention",
        "transformer",
        "MultiHeadAttention fed by three projections of one input → packed-QKV com.microsoft.Attention",
        _attention_steps,
        targets=ORT_TARGETS,
    ),
    FusionRule(
        "BiasGelu",
        "transformer",
        "Gelu(x + bias) → com.microsoft.BiasGelu",
        _bias_gelu_steps,
        targets=ORT_TARGETS,
    ),
    # last: after every rule that consumes Add + LayerNormalization
    FusionRule(
        "ResidualSum",
        "transformer",
        "LayerNorm/RMSNorm(a [+ bias] + b) → the norm of Sum(a [, bias], b) on cpu, so onnxruntime keeps "
        "its faster kernels instead of Skip(Simplified)LayerNormalization",
        _residual_sum_steps,
    ),
]
