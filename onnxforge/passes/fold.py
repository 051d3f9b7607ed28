"""Fold inference-time affine ops into the weights of the Conv/ConvTranspose/Gemm/MatMul they follow.

Two passes, both lossless (up to fp32 rounding of the new weights):

- ``fold-batchnorm``: ``BatchNormalization(Conv|ConvTranspose|Gemm|MatMul(x))`` → one node.
- ``fold-affine``: a constant ``Mul``/``Add``/``Sub``/``Div`` after (or a scalar ``Mul`` + ``Add``
  before) a Conv/ConvTranspose/Gemm/MatMul → new weights and bias.

Both reuse onnxscript's rewrite rules where they exist (``_fuse_batchnorm``, ``_fuse_conv_affine``),
add the checks those miss (training-mode BatchNorm, shared weights for the affine rule), and add
rules in the same pattern/check/rewrite style for what is missing (MatMul + BatchNorm, per-channel
Mul/Add/Sub/Div after any of the four producers). Every candidate left alone is reported with the
reason its rule gave (``MatchResult.fail``). Rules apply inside If/Loop subgraphs too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import MatchResult, RewriteRule, RewriteRuleClassBase, RewriteRuleSet

# Private modules: the rule *classes* are subclassed here to add checks (their public names are
# only rule instances, whose check cannot be extended).
from onnxscript.rewriter.rules.common import _fuse_batchnorm, _fuse_conv_affine

from onnxforge.ir.graph import all_nodes, const_value, keep_interface, unique_name
from onnxforge.ir.io import spill
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.cleanup import apply_guarded, guard_rule, node_count, why_not_matched
from onnxforge.passes.registry import register_pass

__all__ = [
    "FoldAffinePass",
    "FoldBatchNormPass",
    "affine_rules",
    "batchnorm_rules",
]

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_MAX_ROUNDS = 16  # chains such as Conv → Mul → Add → Mul fold one op per round


# The one definition of "constant" (initializer or Constant node, never a graph input).
_const = const_value


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def _other_reader(value: ir.Value, allowed: Sequence[ir.Node]) -> ir.Node | None:
    for user, _ in value.uses():
        if user not in allowed:
            return user
    return None


def _check_weights_owned(
    result: MatchResult, node: ir.Node, inputs: Sequence[ir.Value | None], matched: Sequence[ir.Node]
) -> MatchResult:
    """Fail unless each of ``inputs`` is a constant initializer read only by ``matched`` nodes."""
    for value in inputs:
        if value is None:
            continue
        if not value.is_initializer() or value.const_value is None:
            return result.fail(_not_initializer(node, value))
        if value.is_graph_input() or value.is_graph_output():
            return result.fail(f"initializer {value.name!r} is a graph input or output")
        other = _other_reader(value, matched)
        if other is not None:
            return result.fail(
                f"weight {value.name!r} is shared with node {other.name or other.op_type!r}; "
                "folding would change that node too"
            )
    return result


def _not_initializer(node: ir.Node, value: ir.Value) -> str:
    producer = value.producer()
    source = f"computed by {producer.op_type}" if producer is not None else "a graph input"
    return (
        f"{node.op_type} input {value.name!r} is {source}, not a constant initializer "
        "(run lift-constants and fold-constants first)"
    )


def _explain(reason: str) -> str:
    """onnxscript's matcher reasons, in the words of this pass's report."""
    if "other uses" in reason:
        return "the producer's output is also read by another node or is a graph output"
    return reason


def _scale_output_channels(node: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``weight`` with output channel ``o`` multiplied by ``scale[o]``, for the node's weight layout.

    Conv ``[Cout, Cin/g, k...]``: axis 0. ConvTranspose ``[Cin, Cout/g, k...]``: output channel
    ``o = gi * Cout/g + j`` lives at ``W[gi*Cin/g : (gi+1)*Cin/g, j]``. Gemm: column of B (row when
    ``transB``). MatMul ``[K, N]``: column.
    """
    op = node.op_type
    if op == "Conv":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    if op == "ConvTranspose":
        group = _int_attr(node, "group", 1)
        cin, cout_g = weight.shape[0], weight.shape[1]
        w = weight.reshape((group, cin // group, cout_g) + weight.shape[2:])
        s = scale.reshape((group, 1, cout_g) + (1,) * (weight.ndim - 2))
        return (w * s).reshape(weight.shape)
    if op == "Gemm" and _int_attr(node, "transB", 0):
        return weight * scale.reshape(-1, 1)
    return weight * scale.reshape(1, -1)


def _output_channels(node: ir.Node, weight: np.ndarray) -> int:
    op = node.op_type
    if op == "Conv":
        return weight.shape[0]
    if op == "ConvTranspose":
        return weight.shape[1] * _int_attr(node, "group", 1)
    if op == "Gemm" and _int_attr(node, "transB", 0):
        return weight.shape[0]
    return weight.shape[1]


def apply_rules(rules: Sequence[RewriteRule], model: ir.Model, stats: PassStats) -> int:
    """Apply ``rules`` until none matches; count applications per rule. Returns the total.

    Rules refuse matches that read overridable initializers, and initializers a rule's invented
    name overwrote are re-registered (:func:`onnxforge.passes.cleanup.apply_guarded`)."""
    with keep_interface(model.graph):
        return _apply_rules(rules, model, stats)


def _apply_rules(rules: Sequence[RewriteRule], model: ir.Model, stats: PassStats) -> int:
    total = 0
    for _ in range(_MAX_ROUNDS):
        applied = 0
        for rule in rules:
            n = apply_guarded(RewriteRuleSet([rule]), model)
            if n:
                stats.count(rule.name or "rewrites", n)
                applied += n
        total += applied
        if not applied:
            break
    return total


# --------------------------------------------------------------------------- fold-batchnorm


def _check_batchnorm(result: MatchResult, bn: ir.Node) -> MatchResult:
    """What onnxscript's BatchNorm rules do not check: inference mode and constant statistics."""
    if _int_attr(bn, "training_mode", 0) != 0:
        return result.fail("BatchNormalization is in training mode (uses batch statistics)")
    if len(bn.outputs) > 1 and any(o.name or o.uses() for o in bn.outputs[1:]):
        # Before opset 14 the running-statistics outputs are what selects training mode.
        return result.fail("BatchNormalization has training outputs (running mean/var)")
    for value in bn.inputs[1:5]:
        if _const(value) is None:
            name = value.name if value is not None else "<missing>"
            why = "an overridable graph input" if value is not None and value.is_graph_input() else "not constant"
            return result.fail(f"BatchNormalization parameter {name!r} is {why}")
        if not value.is_initializer():
            return result.fail(_not_initializer(bn, value))
    return result


class _InferenceOnly:
    """Mixin: onnxscript's check (constant, non-input initializers; unshared weight and bias), plus
    inference mode, an empty optional bias and matching channels; the new bias gets a fresh name."""

    def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:
        result = MatchResult()
        bn, inbound = batchnorm_out.producer(), inbound_out.producer()
        if not _check_batchnorm(result, bn):
            return result
        if len(inbound.inputs) > 2 and inbound.inputs[2] is None:
            return result.fail(f"{inbound.op_type} has an empty optional bias input")
        weight = inbound.inputs[1]
        if _const(weight) is None:
            return result.fail(f"{inbound.op_type} weight is not constant")
        base = super().check(context, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        if not base and not _only_bias_shared(base, inbound):
            return base
        channels = bn.inputs[1].const_value.size
        if _output_channels(inbound, _const(weight)) != channels:
            return result.fail("BatchNormalization channels differ from the producer's output channels")
        return result

    def rewrite(self, op, x, inbound_out, batchnorm_out):
        inbound = inbound_out.producer()
        bias = inbound.inputs[2] if len(inbound.inputs) > 2 else None
        shared_bias = bias is not None and (
            _other_reader(bias, [inbound]) is not None or bias.is_graph_output()
        )
        out = super().rewrite(op, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        new_bias = out.producer().inputs[2]
        if shared_bias:
            # onnxscript reuses the old bias name, which would overwrite the other readers' bias.
            new_bias.name = unique_name(inbound.graph, f"{bias.name}_fused")
        elif bias is None:
            # onnxscript names a created bias "<W>_bias", which may be taken.
            new_bias.name = unique_name(inbound.graph, f"{inbound.inputs[1].name}_bias")
        return out


def _only_bias_shared(result: MatchResult, inbound: ir.Node) -> bool:
    """Whether onnxscript's check refused only because the producer's *bias* has other readers.

    That refusal we lift on purpose: :meth:`_InferenceOnly.rewrite` writes the fused bias under a
    new name, so the other readers keep the old one. (Dynamo exports bias-less convs with computed
    zero biases that dedup-initializers merges into one shared bias.) Every other refusal stands.
    """
    bias = inbound.inputs[2] if len(inbound.inputs) > 2 else None
    if bias is None or _const(bias) is None or not bias.is_initializer():
        return False
    reason = result.reason or ""
    return f"'{bias.name}' is used by another node" in reason and _other_reader(inbound.inputs[1], [inbound]) is None


class FoldBatchNormIntoConv(_InferenceOnly, _fuse_batchnorm.FuseBatchNormIntoConv):
    """onnxscript's Conv rule plus inference-mode checks."""


class FoldBatchNormIntoConvTranspose(_InferenceOnly, _fuse_batchnorm.FuseBatchNormIntoConvTranspose):
    """onnxscript's ConvTranspose rule (handles ``group``) plus inference-mode checks."""


class FoldBatchNormIntoGemm(_InferenceOnly, _fuse_batchnorm.FuseBatchNormIntoGemm):
    """onnxscript's Gemm rule (handles ``transB`` and ``beta``) plus inference-mode checks."""


class FoldBatchNormIntoMatMul(RewriteRuleClassBase):
    """``BatchNormalization(MatMul(x, W))`` with 2-D ``x`` and constant ``W`` → ``Gemm(x, W*s, b)``.

    With ``s = gamma / sqrt(var + eps)`` per column and ``b = beta - mean * s``. Only when ``x`` is
    known to be 2-D: for higher ranks BatchNorm's channel axis (1) is not MatMul's column axis.
    """

    def pattern(self, op, x, w):
        return op.BatchNormalization(
            op.MatMul(x, w, _outputs=["inbound_out"]),
            _allow_other_inputs=True,
            _outputs=["batchnorm_out"],
        )

    def check(self, context, x, w, inbound_out, batchnorm_out) -> MatchResult:
        result = MatchResult()
        bn, matmul = batchnorm_out.producer(), inbound_out.producer()
        if not _check_batchnorm(result, bn):
            return result
        if x.shape is None or len(x.shape) != 2:
            return result.fail("MatMul input is not known to be 2-D (BatchNorm channel axis != column)")
        weight = _const(w)
        if weight is None or weight.ndim != 2:
            return result.fail("MatMul weight is not a constant 2-D matrix")
        if weight.shape[1] != bn.inputs[1].const_value.size:
            return result.fail("BatchNormalization channels differ from MatMul columns")
        return _check_weights_owned(result, matmul, [w], [matmul, bn])

    def rewrite(self, op, x, w, inbound_out, batchnorm_out):
        bn = batchnorm_out.producer()
        gamma, beta, mean, var = (v.const_value.numpy() for v in bn.inputs[1:5])
        s = gamma / np.sqrt(var + _float_attr(bn, "epsilon", 1e-5))
        weight = _const(w)
        # spill: under the CLI's spill store the folded weight goes to disk now, not at the pass's end
        new_w = op.initializer(spill(ir.tensor((weight * s.reshape(1, -1)).astype(weight.dtype))), name=w.name)
        bias = (beta - mean * s).astype(weight.dtype)
        name = unique_name(inbound_out.producer().graph, f"{w.name}_bias")
        return op.Gemm(x, new_w, op.initializer(ir.tensor(bias), name=name))


def batchnorm_rules() -> list[RewriteRule]:
    return [
        FoldBatchNormIntoConv.rule(),
        FoldBatchNormIntoConvTranspose.rule(),
        FoldBatchNormIntoGemm.rule(),
        FoldBatchNormIntoMatMul.rule(),
    ]


@register_pass("fold-batchnorm")
class FoldBatchNormPass(Pass):
    """Fold an inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it.

    ``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` equals ``W' x + b'`` with
    ``s = gamma / sqrt(var + eps)``, ``W' = W * s`` along the output-channel axis (Conv: axis 0;
    ConvTranspose ``[Cin, Cout/g, k...]``: axis 1 within each group; Gemm: column of B, row with
    ``transB``; MatMul: column, 2-D input only, result is a Gemm) and ``b' = (beta_gemm*b - mean) * s
    + beta``. Uses onnxscript's ``fuse_batchnorm_into_{conv,conv_transpose,gemm}`` rules.

    Left alone and reported: training-mode BatchNorm; statistics or weights that are not constant
    initializers (an initializer that is also a graph input is not: the caller may override it; see
    ``freeze-inputs``); a weight shared with another node (a shared bias is copied); a producer output read elsewhere or
    that is a graph output; a BatchNorm after anything else. Lossless (fp32 rounding of W', b').
    """

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        rules = batchnorm_rules()
        before = node_count(model, "BatchNormalization")
        where = _batchnorm_readers(model)
        applied = apply_rules(rules, model, stats)
        _restore_producer_names(model, where)
        for node in all_nodes(model):
            if node.op_type == "BatchNormalization":
                stats.skip(node, _explain(why_not_matched([guard_rule(r) for r in rules], model, node)))
        stats.count("batchnorm_folded", before - node_count(model, "BatchNormalization"))
        return applied > 0


def _batchnorm_readers(model: ir.Model) -> list[tuple[str, list[tuple[ir.Node | None, int]]]]:
    """For each BatchNormalization after a named node: that name and where the BN's output is read
    (``(node, input index)``, or ``(None, graph output index)``)."""
    found = []
    for bn in model.graph:
        producer = bn.inputs[0].producer() if bn.op_type == "BatchNormalization" and bn.inputs else None
        if producer is None or not producer.name:
            continue
        readers: list[tuple[ir.Node | None, int]] = [(user, idx) for user, idx in bn.outputs[0].uses()]
        readers += [(None, i) for i, out in enumerate(model.graph.outputs) if out is bn.outputs[0]]
        found.append((producer.name, readers))
    return found


def _restore_producer_names(model: ir.Model, where) -> None:
    """Give each folded layer its original node name back (onnxscript's rewriter names new nodes
    itself), so options that name nodes — ``exclude``, ``protect``, ``layers`` — still find them."""
    taken = {node.name for node in model.graph}
    for name, readers in where:
        if not readers:
            continue
        node, idx = readers[0]
        value = model.graph.outputs[idx] if node is None else node.inputs[idx]
        producer = value.producer() if value is not None else None
        if producer is None or producer.op_type == "BatchNormalization" or producer.name == name:
            continue  # not folded, or already named
        if name not in taken:
            producer.name = name
            taken.add(name)


# --------------------------------------------------------------------------- fold-affine


class FoldAffineAfter(RewriteRuleClassBase):
    """``op_type(Producer(x, W, b), c)`` (or ``op_type(c, Producer(...))``) → ``Producer(x, W', b')``.

    ``c`` is a constant that varies at most along the producer's output-channel axis. Written as
    ``y * scale + shift`` with per-channel vectors: ``Mul c``: (c, 0); ``Div c``: (1/c, 0); ``Add c``:
    (1, c); ``Sub c``: (1, -c); ``c - y``: (-1, c). Then ``W' = W * scale`` (output-channel axis) and
    ``b' = b * scale + shift`` (a bias is created when missing). MatMul has no bias: only scale folds.
    """

    def __init__(self, producer: str, op_type: str, const_first: bool = False):
        suffix = "_const_first" if const_first else ""
        super().__init__(name=f"fold_{op_type.lower()}_into_{producer.lower()}{suffix}")
        self.producer, self.op_type, self.const_first = producer, op_type, const_first

    def pattern(self, op, x, c):
        y = getattr(op, self.producer)(x, _allow_other_inputs=True, _outputs=["prod_out"])
        return getattr(op, self.op_type)(c, y) if self.const_first else getattr(op, self.op_type)(y, c)

    def _scale_shift(self, c: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        if self.op_type == "Mul":
            return c, None
        if self.op_type == "Div":
            return np.reciprocal(c), None
        if self.op_type == "Add":
            return None, c
        if self.const_first:  # c - y
            return -np.ones_like(c), c
        return None, -c

    def _per_channel(self, result: MatchResult, node: ir.Node, x: ir.Value, c: np.ndarray):
        """``c`` as a vector over output channels, or None after ``result.fail``."""
        weight = _const(node.inputs[1])
        channels = _output_channels(node, weight)
        if node.op_type in ("Conv", "ConvTranspose"):
            rank, axis = weight.ndim, 1
        elif node.op_type == "Gemm":
            rank, axis = 2, 1
        else:
            rank = len(x.shape) if x.shape is not None else None
            if rank is None:
                if c.ndim > 1:
                    result.fail("MatMul input rank unknown: only scalar or 1-D constants fold")
                    return None
                rank = max(c.ndim, 1)
            axis = rank - 1
        if c.ndim > rank:
            result.fail(f"constant of rank {c.ndim} would broadcast the rank-{rank} output")
            return None
        shape = (1,) * (rank - c.ndim) + c.shape
        for i, d in enumerate(shape):
            if i != axis and d != 1:
                what = "batch" if i == 0 else ("spatial" if i != axis else "channel")
                result.fail(f"constant varies along axis {i} ({what}); only per-output-channel folds")
                return None
        if shape[axis] not in (1, channels):
            result.fail(f"constant has {shape[axis]} channels, the output has {channels}")
            return None
        return np.broadcast_to(c.reshape(-1), (channels,)).copy()

    def check(self, context, x, c, prod_out) -> MatchResult:
        result = MatchResult()
        node = prod_out.producer()
        const = _const(c)
        if const is None:
            return result.fail(f"{self.op_type} operand is not a constant")
        weight_v = node.inputs[1] if len(node.inputs) > 1 else None
        weight = _const(weight_v)
        if weight is None or not np.issubdtype(weight.dtype, np.floating):
            return result.fail(f"{node.op_type} weight is not a constant float tensor")
        if const.dtype != weight.dtype:
            return result.fail("constant and weight dtypes differ")
        if node.op_type == "MatMul" and weight.ndim != 2:
            return result.fail("MatMul weight is not 2-D")
        vec = self._per_channel(result, node, x, const)
        if vec is None:
            return result
        scale, shift = self._scale_shift(vec)
        if self.op_type == "Div" and not np.all(vec):
            return result.fail("division by a constant containing zeros")
        if node.op_type == "MatMul" and shift is not None:
            return result.fail("MatMul has no bias to absorb an added constant (fuse to Gemm first)")
        # A shared bias is fine (rewrite() gives the new one its own name); a shared weight is not.
        bias_v = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_v is not None and (not bias_v.is_initializer() or _const(bias_v) is None):
            return result.fail(_not_initializer(node, bias_v))
        if scale is not None:
            return _check_weights_owned(result, node, [weight_v], [node])
        return result

    def rewrite(self, op, x, c, prod_out):
        node = prod_out.producer()
        graph = node.graph
        weight_v = node.inputs[1]
        weight = _const(weight_v)
        dtype = weight.dtype
        vec = self._per_channel(MatchResult(), node, x, _const(c))
        scale, shift = self._scale_shift(vec)
        inputs = [x]
        if scale is not None:
            new_w = _scale_output_channels(node, weight, scale).astype(dtype)
            inputs.append(op.initializer(spill(ir.tensor(new_w)), name=weight_v.name))
        else:
            inputs.append(weight_v)
        attributes = dict(node.attributes)
        if node.op_type != "MatMul":
            bias_v = node.inputs[2] if len(node.inputs) > 2 else None  # None also for an empty ""
            # Gemm: y = alpha*A*B + beta*C. The new C carries beta, so beta goes (also without a C).
            beta_attr = attributes.pop("beta", None) if node.op_type == "Gemm" else None
            if bias_v is not None:
                bias = bias_v.const_value.numpy().astype(np.float64)
                if beta_attr is not None:
                    bias = bias * beta_attr.as_float()
                shared = _other_reader(bias_v, [node]) is not None or bias_v.is_graph_output()
                name = unique_name(graph, f"{bias_v.name}_fused") if shared else bias_v.name
            else:
                bias = np.zeros(vec.shape, np.float64)
                name = unique_name(graph, f"{weight_v.name}_bias")
            if scale is not None:
                bias = bias * scale
            if shift is not None:
                bias = bias + shift
            inputs.append(op.initializer(ir.tensor(bias.astype(dtype)), name=name))
        return op.op(node.op_type, *inputs, **attributes)


class AffineBeforeConv(_fuse_conv_affine.AffineConvFusion):
    """onnxscript's ``Conv(x * s + o)`` rule (scalar s, o; no padding) plus a shared-weight check.

    ``Conv(x*s + o, W, b) = Conv(x, W*s, b + o * sum(W))`` when the Conv pads nothing (padding would
    be zeros, not ``o``). onnxscript's rule copies a shared weight under a new name; we refuse instead.
    """

    def check(self, context, x, w, b, scale, offset, conv_out) -> MatchResult:
        result = super().check(context, x, w, b, scale, offset, conv_out)
        if not result:
            return result
        conv = conv_out.producer()
        if conv.attributes.get("auto_pad") is not None and conv.attributes["auto_pad"].as_string() not in (
            "NOTSET",
            "VALID",
        ):
            return result.fail("Conv pads automatically; an offset before it would reach the padding")
        if _const(w) is not None and _const(w).ndim != 4:
            return result.fail("only 2-D convolutions")
        return _check_weights_owned(result, conv, [w, b], [conv])


def affine_rules() -> list[RewriteRule]:
    rules = []
    for producer in _PRODUCERS:
        for op_type in ("Mul", "Add"):
            rules.append(FoldAffineAfter.rule(producer, op_type))
            rules.append(FoldAffineAfter.rule(producer, op_type, const_first=True))
        rules.append(FoldAffineAfter.rule(producer, "Sub"))
        rules.append(FoldAffineAfter.rule(producer, "Sub", const_first=True))
        rules.append(FoldAffineAfter.rule(producer, "Div"))
    rules.extend(AffineBeforeConv.rule().commute())  # Mul(c, x), Add(c, .): paddle2onnx writes the constant first
    return rules


def _affine_candidate(node: ir.Node) -> bool:
    if node.op_type not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    for y, c in ((a, b), (b, a)):
        if y is not None and c is not None and c.const_value is not None:
            producer = y.producer()
            if producer is not None and producer.op_type in _PRODUCERS:
                return True
    return False


@register_pass("fold-affine")
class FoldAffinePass(Pass):
    """Fold constant Mul/Add/Sub/Div after a Conv/ConvTranspose/Gemm/MatMul into its weights and bias.

    For ``y = W x + b`` followed by ``y * s + t`` with per-output-channel (or scalar) constants:
    ``W' = W * s`` (output-channel axis), ``b' = b * s + t``; ``Div c`` is ``Mul 1/c``, ``Sub c`` is
    ``Add -c``, ``c - y`` is ``y * -1 + c``; a bias is created when the producer has none (MatMul has
    no bias input: only Mul/Div fold into it). Also ``Conv(x * s + o)`` with scalar s, o and no
    padding (onnxscript's ``affine_conv_fusion_rule``, either operand order: paddle2onnx writes
    ``Add(o, Mul(s, x))``): ``W' = W * s``, ``b' = b + o * sum(W)`` over each output channel's
    taps. Chains fold one op at a time until none is left.

    Left alone and reported: a constant varying along batch or spatial axes (or of higher rank than
    the output); a constant, weight or bias that is also a graph input (overridable; see
    ``freeze-inputs``); a weight shared with another node (a shared bias is copied); a producer output that is a graph
    output or read by another node; division by a constant with zeros; non-constant weights.
    Lossless (fp32 rounding of W', b'; ``y / c`` becomes ``y * (1/c)``).
    """

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        rules = affine_rules()
        before = node_count(model)
        applied = apply_rules(rules, model, stats)
        for node in all_nodes(model):
            if _affine_candidate(node):
                stats.skip(node, _explain(why_not_matched([guard_rule(r) for r in rules], model, node)))
        stats.count("nodes_removed", before - node_count(model))
        return applied > 0
