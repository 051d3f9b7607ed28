"""CNN fusions: Conv+activation, Conv+residual Add(+activation), HardSwish, Pad into Conv,
MatMul+Add → Gemm, redundant Transpose/Reshape chains, Min/Max → Clip, successive Relu/Clip.

All but ``FusedConv`` and ``FusedConvAdd`` are onnxscript's own rules
(``onnxscript.rewriter.rules.common``), grouped and named for the report. Those two are written here
in the same pattern style.

``FusedConv`` is opt-in (``fuse(rules=[FusedConv])``, not in the default set). Why only for CPU/CUDA: onnxruntime's session optimizer (level EXTENDED and above) already
rewrites Conv+activation into ``com.microsoft.FusedConv`` on CPU, so emitting it ourselves changes
nothing at ``ORT_ENABLE_ALL`` (measured in bench/bench_fuse.py) but keeps the fusion when a session
runs at BASIC (or with the optimizer off) and is exactly what onnxruntime itself produces. Its CPU
kernel (MLAS) knows Relu, LeakyRelu, Tanh, Sigmoid, Clip and HardSigmoid; SiLU (x·Sigmoid(x)) and
HardSwish have no FusedConv activation, so those Conv outputs are left alone and reported as
near-misses. The CUDA kernel only takes Relu. TensorRT fuses on its own and cannot run contrib
ops, so nothing is emitted for it.

``FusedConvAdd`` (opt-in, target ``cpu`` only) is the residual form: ``act(Add(Conv(x, w[, b]), z))``
or ``Add(Conv(x, w[, b]), z)`` (either operand order) → ``FusedConv(x, w, b, z[, activation])``
using the CPU kernel's optional 4th input ``Z``: ``Y = act(Conv(x, w) + b + Z)``. ``Z`` must have
exactly the Conv output's shape (the kernel does not broadcast), so a broadcasting Add is a reported
near-miss; float32 only; a missing bias is passed as an empty input. At ``ORT_ENABLE_ALL``
onnxruntime's NCHWc transformer fuses the same Add into its own Conv and produces the same graph
from either input; at BASIC/EXTENDED it leaves the Add (its ConvAddActivationFusion also skips
bias-less Convs). Measured (single thread, resnet_style / mobilenetv2_style at batch 1 and 8,
ratios fused/unfused p50): 0.97–1.02 at ALL, 0.90–1.06 at BASIC/EXTENDED, i.e. no consistent
gain beyond noise, hence opt-in. CUDA's FusedConv also takes ``Z`` but only with Relu; not
verified here (no CUDA build of onnxruntime), so it is not emitted for CUDA.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as common_rules

# Private modules: their rule *classes* are subclassed below to add the checks they lack (the
# public names are rule instances, whose check cannot be extended).
from onnxscript.rewriter.rules.common import (
    _fuse_hardswish,
    _fuse_relus_clips,
    _matmul_add_to_gemm,
    _min_max_to_clip,
)

from onnxforge.ir.graph import const_value
from onnxforge.passes.fuse._rule import ORT_TARGETS, FusionRule, Step, ruleset

# activation op -> FusedConv "activation" string, per target
_CPU_ACTIVATIONS = ("Relu", "LeakyRelu", "Tanh", "Sigmoid", "Clip", "HardSigmoid")
_CUDA_ACTIVATIONS = ("Relu",)


class ConvActivationFusion(pattern.RewriteRuleClassBase):
    """``act(Conv(x, w[, b]))`` → ``com.microsoft.FusedConv(x, w[, b], activation=act)``.

    Lossless: FusedConv applies the same activation to the same convolution in one kernel.
    """

    def __init__(self, activation: str, has_bias: bool):
        super().__init__(f"FusedConv_{activation}{'_bias' if has_bias else ''}")
        self._activation = activation
        self._has_bias = has_bias

    def pattern(self, op, x, w, b, clip_min, clip_max):
        if self._has_bias:
            conv = op.Conv(x, w, b, _allow_other_attributes=True, _outputs=["conv"])
        else:
            conv = op.Conv(x, w, _allow_other_attributes=True, _outputs=["conv"])
        if self._activation == "Clip":
            return op.Clip(conv, clip_min, clip_max, _outputs=["act"])
        return getattr(op, self._activation)(conv, _allow_other_attributes=True, _outputs=["act"])

    def check(self, context, x, w, conv, act, clip_min=None, clip_max=None, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("FusedConv is float32 only in onnxruntime", x)
        if self._activation == "Clip":
            return _check_clip_bounds(result, act, clip_min, clip_max)
        return result

    def rewrite(self, op, x, w, b, conv, act, clip_min=None, clip_max=None, **_):
        attrs = dict(conv.producer().attributes.items())
        attrs.update(_activation_attrs(self._activation, act.producer(), clip_min, clip_max))
        inputs = (x, w, b) if self._has_bias else (x, w)
        return op.FusedConv(*inputs, _domain="com.microsoft", **attrs)


def _singleton(value: ir.Value | None) -> float | None:
    """The one element of a constant (not overridable) tensor, or None."""
    array = const_value(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _activation_attrs(activation: str | None, act_node: ir.Node | None, clip_min, clip_max) -> dict:
    """FusedConv's ``activation`` and ``activation_params`` attributes for an ONNX activation node
    (parameters as onnxruntime's own Conv+activation fusions read them, defaults included)."""
    if activation is None:
        return {}
    params: list[float] = []
    if activation == "Clip":
        params = [
            float(_singleton(clip_min)),
            float(_singleton(clip_max)),
        ]
    elif activation == "LeakyRelu":
        params = [act_node.attributes.get_float("alpha", 0.01)]
    elif activation == "HardSigmoid":
        params = [
            act_node.attributes.get_float("alpha", 0.2),
            act_node.attributes.get_float("beta", 0.5),
        ]
    attrs: dict = {"activation": activation}
    if params:
        attrs["activation_params"] = params
    return attrs


def _check_clip_bounds(result: pattern.MatchResult, act: ir.Value, clip_min, clip_max) -> pattern.MatchResult:
    for bound in (clip_min, clip_max):
        if bound is None or _singleton(bound) is None:
            return result.fail("Clip bounds are not constant scalars", act.producer())
    return result


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    """Statically the same shape: equal ranks, each dim the same int or the same named symbol
    (an unnamed/unknown dim proves nothing)."""
    if a is None or b is None or a.rank() != b.rank():
        return False
    for da, db in zip(a.dims, b.dims):
        if isinstance(da, int) or isinstance(db, int):
            if da != db:
                return False
        elif da.value is None or da.value != db.value:
            return False
    return True


class ConvAddFusion(pattern.RewriteRuleClassBase):
    """``[act](Add(Conv(x, w[, b]), z))`` → ``com.microsoft.FusedConv(x, w, b|"", z, activation=act)``.

    onnxruntime's CPU kernel preloads the output with ``Z`` and accumulates the convolution into it
    (GEMM with β=1), then adds the bias and applies the activation:
    ``Y = act(Conv(x, w) + b + Z)`` — the same function, the sum in a different order (lossless up
    to fp32 rounding). ``Z`` must have exactly the Conv output's shape (the kernel refuses to
    broadcast), so the match requires statically equal shapes (same ints or same named dims).
    Without a bias, the bias input is left empty (the kernel reads a missing bias as none).
    """

    def __init__(self, activation: str | None, has_bias: bool):
        act = activation or "none"
        super().__init__(f"FusedConvAdd_{act}{'_bias' if has_bias else ''}")
        self._activation = activation
        self._has_bias = has_bias

    def pattern(self, op, x, w, b, z, clip_min, clip_max):
        if self._has_bias:
            conv = op.Conv(x, w, b, _allow_other_attributes=True, _outputs=["conv"])
        else:
            conv = op.Conv(x, w, _allow_other_attributes=True, _outputs=["conv"])
        total = op.Add(conv, z, _outputs=["total"])
        if self._activation is None:
            return total
        if self._activation == "Clip":
            return op.Clip(total, clip_min, clip_max, _outputs=["act"])
        return getattr(op, self._activation)(total, _allow_other_attributes=True, _outputs=["act"])

    def check(self, context, x, z, conv, total, act=None, clip_min=None, clip_max=None, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT or z.dtype != ir.DataType.FLOAT:
            return result.fail("FusedConv's Z input is float32 only in onnxruntime's CPU kernel", x)
        if z is conv:
            return result.fail("Add(conv, conv): the Conv output is both operands", total.producer())
        if not _same_shape(conv.shape, z.shape):
            return result.fail(
                f"Add operand shape {z.shape} is not statically the Conv output shape {conv.shape}: "
                "FusedConv's Z input does not broadcast",
                total.producer(),
            )
        if self._activation == "Clip":
            return _check_clip_bounds(result, act, clip_min, clip_max)
        return result

    def rewrite(self, op, x, w, z, conv, b=None, act=None, clip_min=None, clip_max=None, **_):
        attrs = dict(conv.producer().attributes.items())
        attrs.update(
            _activation_attrs(self._activation, act.producer() if act is not None else None, clip_min, clip_max)
        )
        return op.FusedConv(x, w, b if self._has_bias else None, z, _domain="com.microsoft", **attrs)


class ConvUnsupportedActivation(pattern.RewriteRuleClassBase):
    """Explain-only: Conv followed by SiLU or HardSwish, which FusedConv cannot absorb."""

    def __init__(self, kind: str):
        super().__init__(f"FusedConv_{kind}")
        self._kind = kind

    def pattern(self, op, x, w):
        conv = op.Conv(x, w, _allow_other_inputs=True, _allow_other_attributes=True)
        if self._kind == "SiLU":
            return op.Mul(conv, op.Sigmoid(conv))
        return op.HardSwish(conv)

    def check(self, context, **_):
        return pattern.MatchResult().fail(
            f"Conv→{self._kind} left as is: onnxruntime's FusedConv has no {self._kind} activation"
        )

    def rewrite(self, op, **_):  # never reached: check always fails
        return None


# --------------------------------------------------------------------------- onnxscript rules, checked


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


def _check_no_rank_raise(result: pattern.MatchResult, x: ir.Value, constants, fused: str) -> pattern.MatchResult:
    """Fail when a constant has more axes than ``x``: it broadcasts the output to a higher rank,
    which the fused op (applied to ``x`` alone) would not (or when ``x``'s rank is unknown)."""
    rank = _rank(x)
    for value in constants:
        array = const_value(value)
        if array is None or array.ndim == 0:
            continue
        if rank is None or array.ndim > rank:
            return result.fail(
                f"constant {value.name!r} of rank {array.ndim} would raise the output's rank (input rank "
                f"{'unknown' if rank is None else rank}); {fused} keeps the input's shape"
            )
    return result


class _KeepRank:
    """Mixin for onnxscript's Min/Max rules: also refuse rank-raising constants."""

    def check(self, context, out1, out2, **kwargs):
        result = super().check(context, out1, out2, **kwargs)  # type: ignore[misc]
        if not result:
            return result
        first, second = out1.producer(), out2.producer()
        return _check_no_rank_raise(result, first.inputs[0], [*first.inputs[1:], *second.inputs[1:]],
                                    self.op_type)


class MaxMinToClip(_KeepRank, _min_max_to_clip.FuseMaxMinToClip):
    """``Min(Max(x, lo), hi)`` → ``Clip(x, lo, hi)`` (onnxscript's), refusing rank-raising bounds."""


class MinMaxToClip(_KeepRank, _min_max_to_clip.FuseMinMaxToClip):
    """``Max(Min(x, hi), lo)`` → ``Clip(x, lo, hi)`` (onnxscript's), refusing rank-raising bounds."""


def _bounds(node: ir.Node) -> tuple[float, float]:
    """A Clip node's (min, max) as floats, -inf/inf where absent (the caller checked constness)."""
    inputs = [*node.inputs[1:3], None, None]
    lo = const_value(inputs[0]) if inputs[0] is not None else None
    hi = const_value(inputs[1]) if inputs[1] is not None else None
    return (-np.inf if lo is None else float(np.max(lo)), np.inf if hi is None else float(np.min(hi)))


class SuccessiveClip(_fuse_relus_clips.FuseSuccessiveClip):
    """``Clip(Clip(x, a, b), c, d)`` → ``Clip(x, max(a, c), min(b, d))`` (onnxscript's), only when the
    two ranges intersect: for disjoint ones the result is the constant ``c`` or ``d``, not that Clip."""

    def check(self, context, **kwargs):
        result = super().check(context, **kwargs)
        if not result:
            return result
        (a, b), (c, d) = _bounds(kwargs["out_first_clip"].producer()), _bounds(kwargs["out_second_clip"].producer())
        if max(a, c) > min(b, d):
            return result.fail(f"Clip ranges [{a}, {b}] and [{c}, {d}] do not intersect")
        return result


class SuccessiveReluClip(_fuse_relus_clips.FuseSuccessiveReluClip):
    """``Relu(Clip(x, a, b))`` → ``Clip(x, max(a, 0), b)`` (onnxscript's), only when ``b >= max(a, 0)``:
    for ``b < 0`` the result is 0 everywhere, not ``b``."""

    def check(self, context, **kwargs):
        result = super().check(context, **kwargs)
        if not result:
            return result
        a, b = _bounds(kwargs["out_first_clip"].producer())
        if max(a, 0.0) > b:
            return result.fail(f"Clip max {b} is below Relu's 0: Relu(Clip) is 0 there, not a Clip")
        return result


class HardSwishFusion(_fuse_hardswish.HardSwishFusion):
    """``x * Clip(x + 3, 0, 6) / 6`` → ``HardSwish(x)`` (onnxscript's), refusing rank-raising constants."""

    def check(self, op, x, clip_min, clip_max, bias, divisor):
        result = super().check(op, x, clip_min, clip_max, bias, divisor)
        return _check_no_rank_raise(result, x, [clip_min, clip_max, bias, divisor], "HardSwish") if result else result


class HardSigmoidFusion(_fuse_hardswish.HardSigmoidFusion):
    """``Clip(x + 3, 0, 6) / 6`` → ``HardSigmoid(x)`` (onnxscript's), refusing rank-raising constants."""

    def check(self, op, x, clip_min, clip_max, bias, divisor):
        result = super().check(op, x, clip_min, clip_max, bias, divisor)
        return _check_no_rank_raise(result, x, [clip_min, clip_max, bias, divisor], "HardSigmoid") if result else result


class HardSwishAsHardSigmoidMul(HardSwishFusion):
    """``x * Clip(x + 3, 0, 6) / 6`` → ``x * HardSigmoid(x)`` (α = 1/6, β = 1/2) below opset 14, which has
    no HardSwish: the same function, ``HardSigmoid(x) = clip(x/6 + 1/2, 0, 1) = clip(x + 3, 0, 6) / 6``,
    in 2 ops instead of 4 (paddle2onnx's opset-12 PP-OCR models write every HardSwish this way). The
    int8 quantizer then reads one ``[0, 1]`` gate and one product (2 rounding points, not 4)."""

    def rewrite(self, op, x, clip_min, clip_max, bias, divisor):
        return op.Mul(x, op.HardSigmoid(x, alpha=1.0 / 6.0, beta=0.5))


def _hardswish_rules() -> pattern.RewriteRuleSet:
    return ruleset(HardSwishFusion().rule(), HardSigmoidFusion().rule(),
                   _fuse_hardswish.HardSwishFusionFromHardSigmoid().rule(), commute=True)


def _dims_match(c: int | ir.SymbolicDim, out: int | ir.SymbolicDim) -> bool:
    if c == 1:
        return True
    if isinstance(c, int) or isinstance(out, int):
        return c == out
    return c.value is not None and c.value == out.value


class _GemmBias:
    """Mixin for onnxscript's MatMul+Add → Gemm rules: C must broadcast *to* the (M, N) product
    (Gemm's C is unidirectional), not the product to a larger shape as Add may."""

    def check(self, context, input_a, input_b, input_c=None, **kwargs):
        result = super().check(context, input_a, input_b, input_c=input_c, **kwargs)  # type: ignore[misc]
        if not result:
            return result
        c_shape = input_c.shape if input_c is not None else None
        if c_shape is None or c_shape.rank() > 2:
            return result.fail(f"Add operand shape {c_shape} is unknown or of rank > 2: not a Gemm bias")
        m = input_a.shape[1 if self.trans_a else 0]
        n = input_b.shape[0 if self.trans_b else 1]
        out = (m, n)[2 - c_shape.rank():]
        if not all(_dims_match(c, o) for c, o in zip(c_shape.dims, out)):
            return result.fail(f"Add operand shape {c_shape} does not broadcast to the product's (M, N) = {(m, n)}")
        return result


class MatMulAddToGemm(_GemmBias, _matmul_add_to_gemm.MatMulAddToGemm):
    """``Add(MatMul(a, b), c)`` → ``Gemm(a, b, c)`` (onnxscript's), C checked."""


class TransAMatMulAddToGemm(_GemmBias, _matmul_add_to_gemm.TransAMatMulAddToGemm):
    """``Add(MatMul(Transpose(a), b), c)`` → ``Gemm(a, b, c, transA=1)`` (onnxscript's), C checked."""


class TransBMatMulAddToGemm(_GemmBias, _matmul_add_to_gemm.TransBMatMulAddToGemm):
    """``Add(MatMul(a, Transpose(b)), c)`` → ``Gemm(a, b, c, transB=1)`` (onnxscript's), C checked."""


class TransABMatMulAddToGemm(_GemmBias, _matmul_add_to_gemm.TransABMatMulAddToGemm):
    """``Add(MatMul(Transpose(a), Transpose(b)), c)`` → ``Gemm(a, b, c, transA=1, transB=1)``, C checked."""


def _fused_conv(target: str, opset: int) -> Sequence[Step] | str:
    if target == "tensorrt":
        return "TensorRT fuses Conv+activation itself and cannot run com.microsoft.FusedConv"
    acts = _CPU_ACTIVATIONS if target == "cpu" else _CUDA_ACTIVATIONS
    rules = [ConvActivationFusion.rule(a, has_bias) for a in acts for has_bias in (True, False)]
    near = [ConvUnsupportedActivation.rule(k) for k in ("SiLU", "HardSwish")]
    return [Step(ruleset(*rules)), Step(ruleset(*near, commute=True), counted=False)]


def _fused_conv_add(target: str, opset: int) -> Sequence[Step] | str:
    if target != "cpu":
        # CUDA's FusedConv takes Z too, but only with activation Relu (cuDNN's fused
        # conv-bias-activation); not verified here, so not emitted. TensorRT/onnx: no contrib ops.
        return f"the Conv+Add form of FusedConv is emitted for target 'cpu' only, not {target!r}"
    with_act = [ConvAddFusion.rule(a, has_bias) for a in _CPU_ACTIVATIONS for has_bias in (True, False)]
    plain = [ConvAddFusion.rule(None, has_bias) for has_bias in (True, False)]
    # Two steps: Conv+Add+act first, or the plain rule would take the Add and strand the act.
    return [Step(ruleset(*with_act, commute=True)), Step(ruleset(*plain, commute=True))]


def _hardswish(target: str, opset: int) -> Sequence[Step] | str:
    if opset < 6:
        return f"HardSigmoid needs opset 6, model has {opset}"
    if opset < 14:  # no HardSwish op: its x * HardSigmoid(x) form
        return [Step(ruleset(HardSwishAsHardSigmoidMul().rule(), HardSigmoidFusion().rule(), commute=True))]
    return [Step(_hardswish_rules())]


def _steps(*rules: pattern.RewriteRule, commute: bool = False):
    return lambda target, opset: [Step(ruleset(*rules, commute=commute))]


RULES: list[FusionRule] = [
    FusionRule(
        "PadConv",
        "cnn",
        "Pad(x) → Conv: the constant zero padding becomes Conv's pads",
        _steps(common_rules.normalize_pad_format_conv_rule, common_rules.fuse_pad_into_conv_rule),
    ),
    FusionRule(
        "Clip",
        "cnn",
        "Min/Max by constants → Clip; Min∘Min, Max∘Max merged",
        _steps(
            common_rules.min_min_rule,
            common_rules.max_max_rule,
            MinMaxToClip().rule(),
            MaxMinToClip().rule(),
        ),
    ),
    FusionRule(
        "ReluClip",
        "cnn",
        "successive Relu/Clip merged into one",
        _steps(
            common_rules.successive_relu_rule,
            SuccessiveClip().rule(),
            common_rules.successive_clip_relu_rule,
            SuccessiveReluClip().rule(),
        ),
    ),
    FusionRule(
        "HardSwish",
        "cnn",
        "x·HardSigmoid(x), x·Clip(x+3,0,6)/6 → HardSwish (opset 14; below it x·HardSigmoid(x))",
        _hardswish,
    ),
    FusionRule(
        "TransposeChain",
        "cnn",
        "Transpose∘Transpose composed; identity Transpose removed",
        _steps(common_rules.transpose_transpose_rule, common_rules.no_op_transpose_rule),
    ),
    FusionRule(
        "ReshapeChain",
        "cnn",
        "Reshape∘Reshape and Unsqueeze∘Unsqueeze collapsed",
        _steps(common_rules.reshape_reshape_rule, common_rules.unsqueeze_unsqueeze_rule),
    ),
    FusionRule(
        "Gemm",
        "cnn",
        "MatMul(A, B) + C on 2-D operands (optionally transposed) → Gemm",
        _steps(
            TransABMatMulAddToGemm().rule(),
            TransAMatMulAddToGemm().rule(),
            TransBMatMulAddToGemm().rule(),
            MatMulAddToGemm().rule(),
            commute=True,
        ),
    ),
    FusionRule(
        "FusedConv",
        "cnn",
        "Conv + Relu/LeakyRelu/Tanh/Sigmoid/Clip/HardSigmoid → com.microsoft.FusedConv",
        _fused_conv,
        targets=ORT_TARGETS,
        # opt-in: onnxruntime makes the same FusedConv at session creation (EXTENDED level and
        # above), and bench/bench_fuse.py measured no gain from emitting it ourselves.
        default=False,
    ),
    FusionRule(
        "FusedConvAdd",
        "cnn",
        "Conv + Add(z) [+ Relu/LeakyRelu/Tanh/Sigmoid/Clip/HardSigmoid] → com.microsoft.FusedConv "
        "with Z (residual; same-shape z only; CPU)",
        _fused_conv_add,
        targets=ORT_TARGETS,
        # opt-in: at ORT_ENABLE_ALL onnxruntime's NCHWc transformer makes the same fusion; at BASIC/
        # EXTENDED the measured ratios were 0.90-1.06 (no consistent gain; see the module docstring).
        default=False,
    ),
]
