"""CNN fusions: Conv+activation, HardSwish, Pad into Conv, MatMul+Add → Gemm, redundant
Transpose/Reshape chains, Min/Max → Clip, successive Relu/Clip.

All but ``FusedConv`` are onnxscript's own rules (``onnxscript.rewriter.rules.common``), grouped and
named for the report. ``FusedConv`` is written here in the same pattern style.

``FusedConv`` is opt-in (``fuse(rules=[FusedConv])``, not in the default set). Why only for CPU/CUDA: onnxruntime's session optimizer (level EXTENDED and above) already
rewrites Conv+activation into ``com.microsoft.FusedConv`` on CPU, so emitting it ourselves changes
nothing at ``ORT_ENABLE_ALL`` (measured in bench/bench_fuse.py) but keeps the fusion when a session
runs at BASIC (or with the optimizer off) and is exactly what onnxruntime itself produces. Its CPU
kernel (MLAS) knows Relu, LeakyRelu, Tanh, Sigmoid, Clip and HardSigmoid; SiLU (x·Sigmoid(x)) and
HardSwish have no FusedConv activation, so those Conv outputs are left alone and reported as
near-misses. The CUDA kernel only takes Relu. TensorRT fuses on its own and cannot run contrib
ops, so nothing is emitted for it.
"""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.rules import common as common_rules

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
            params = []
            for bound in (clip_min, clip_max):
                value = _ir_utils.get_singleton_value(bound) if bound is not None else None
                if value is None:
                    return result.fail("Clip bounds are not constant scalars", act.producer())
                params.append(float(value))
        return result

    def rewrite(self, op, x, w, b, conv, act, clip_min=None, clip_max=None, **_):
        attrs = {k: v for k, v in conv.producer().attributes.items()}
        act_node = act.producer()
        params: list[float] = []
        if self._activation == "Clip":
            params = [
                float(_ir_utils.get_singleton_value(clip_min)),
                float(_ir_utils.get_singleton_value(clip_max)),
            ]
        elif self._activation == "LeakyRelu":
            params = [act_node.attributes.get_float("alpha", 0.01)]
        elif self._activation == "HardSigmoid":
            params = [
                act_node.attributes.get_float("alpha", 0.2),
                act_node.attributes.get_float("beta", 0.5),
            ]
        if params:
            attrs["activation_params"] = ir.AttrFloat32s("activation_params", params)
        inputs = (x, w, b) if self._has_bias else (x, w)
        return op.FusedConv(
            *inputs,
            activation=self._activation,
            _domain="com.microsoft",
            **{k: v for k, v in attrs.items() if k != "activation_params"},
            **({"activation_params": params} if params else {}),
        )


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


def _fused_conv(target: str, opset: int) -> Sequence[Step] | str:
    if target == "tensorrt":
        return "TensorRT fuses Conv+activation itself and cannot run com.microsoft.FusedConv"
    acts = _CPU_ACTIVATIONS if target == "cpu" else _CUDA_ACTIVATIONS
    rules = [ConvActivationFusion.rule(a, has_bias) for a in acts for has_bias in (True, False)]
    near = [ConvUnsupportedActivation.rule(k) for k in ("SiLU", "HardSwish")]
    return [Step(ruleset(*rules)), Step(ruleset(*near, commute=True), counted=False)]


def _hardswish(target: str, opset: int) -> Sequence[Step] | str:
    if opset < 14:
        return f"HardSwish needs opset 14, model has {opset}"
    return [Step(common_rules.fuse_hardswish_rules())]


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
            common_rules.min_max_rule,
            common_rules.max_min_rule,
        ),
    ),
    FusionRule(
        "ReluClip",
        "cnn",
        "successive Relu/Clip merged into one",
        _steps(
            common_rules.successive_relu_rule,
            common_rules.successive_clip_rule,
            common_rules.successive_clip_relu_rule,
            common_rules.successive_relu_clip_rule,
        ),
    ),
    FusionRule(
        "HardSwish",
        "cnn",
        "x·HardSigmoid(x), x·Clip(x+3,0,6)/6 → HardSwish (opset 14)",
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
            common_rules.transpose_ab_matmul_add_to_gemm_rule,
            common_rules.transpose_a_matmul_add_to_gemm_rule,
            common_rules.transpose_b_matmul_add_to_gemm_rule,
            common_rules.matmul_add_to_gemm_rule,
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
]
