"""``quantize-int8``: static int8 quantization in QDQ form, calibrated, target-aware.

The pass works in three steps, each reusable by the accuracy fallback and the latency guard:

1. :func:`analyze` classifies every main-graph node: a *weighted* op (Conv, ConvTranspose, Gemm,
   MatMul with a constant weight), an *int8 op* that extends an int8 region (Add, Mul, Concat,
   AveragePool, GlobalAveragePool), a *scale-sharing* op (MaxPool, Resize, Reshape, Transpose,
   Flatten, Squeeze, Unsqueeze: int8 in = int8 out with the same scale), a *foldable* activation
   (Relu, Clip(min=0): the output Q's saturation implements it), or float (everything else,
   e.g. Softmax, LayerNormalization, Gelu, HardSwish) - each skip has a reason.
2. :func:`select` picks the nodes to quantize: weighted ops always; the others only when they touch
   a quantized neighbour, because a lone QLinearAdd surrounded by float ops costs more Q/DQ than
   it saves (onnxruntime only gains where a whole region runs in integer kernels).
3. :func:`apply_plan` rewrites the graph: for every quantized tensor ``t`` a ``QuantizeLinear ->
   DequantizeLinear`` pair, read by the quantized consumers (and by every consumer when ``t``'s
   producer is quantized, so onnxruntime can fuse ``DQ -> op -> Q`` into ``QLinearConv`` etc.);
   weights stored as int8 initializers behind a ``DequantizeLinear``; biases as int32.

Math (see :mod:`.qmath`): ``q = saturate(round_half_even(x / s) + z)``, ``x' = (q - z) * s``;
activations asymmetric uint8 ``s = (hi - lo) / 255``, ``z = round(-lo / s)`` (cpu) or symmetric
int8 ``s = max|x| / 127``, ``z = 0`` (tensorrt); weights symmetric int8 in [-127, 127] per output
channel (Conv axis 0, ConvTranspose axis 1, Gemm axis 0 if ``transB`` else 1, MatMul last axis);
bias int32 with ``s_b = s_x * s_w``, ``z = 0``.

Lossy: each quantized tensor carries at most ``s / 2`` rounding error inside its calibrated range
and saturates outside. The stated bound (``tolerance``) is a max abs error of 10% of the output's
magnitude; the accuracy budget ``max_drop`` bounds ``1 - cosine`` (or the drop of a user metric).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.errors import CalibrationDataError, PassOptionError, UnsupportedModelError
from onnxforge.ir.graph import const_value, opset_version, unique_name
from onnxforge.passes.base import Pass, PassStats, Skip
from onnxforge.passes.quantize import calibrate as cal
from onnxforge.passes.quantize.qmath import (
    WEIGHT_QMAX,
    WEIGHT_QMAX_REDUCED,
    QParams,
    activation_qparams,
    quantize_bias,
    quantize_weight,
    u8s8_saturation_risk,
    weight_qparams,
    weight_scale_floor,
)
from onnxforge.passes.registry import register_pass

logger = logging.getLogger(__name__)

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
INT8_OPS = {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"}
SHARE_SCALE = {"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}
FOLDABLE = {"Relu", "Clip"}
LEFT_FLOAT_REASONS = {
    "Softmax": "Softmax stays float (no fused int8 kernel worth its accuracy cost)",
    "LayerNormalization": "LayerNormalization stays float (needs float statistics)",
    "Gelu": "Gelu stays float (no fused int8 kernel)",
    "HardSwish": "HardSwish stays float (no int8 kernel on the onnxruntime CPU target)",
    "HardSigmoid": "HardSigmoid stays float (no int8 kernel on the onnxruntime CPU target)",
}
# Ops not worth a line in the report when they stay float (shape plumbing, constants).
_QUIET = {"Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Identity", "ConstantOfShape",
          "Range", "Slice", "Expand", "Equal", "Where", "Split", "Pad"}
# Which inputs of a scale-sharing op carry the data (the rest are shapes/scales/perms).
_DATA_INPUT = 0


# ------------------------------------------------------------------------------ analysis


@dataclasses.dataclass
class NodeInfo:
    index: int
    name: str
    op_type: str
    role: str  # weighted | int8 | share | fold | float
    weight_input: int | None = None
    weight_axis: int | None = None
    bias_input: int | None = None
    reason: str = ""


@dataclasses.dataclass
class Analysis:
    infos: list[NodeInfo]
    skipped: list[tuple[str, str, str]]  # (name, op_type, reason) for nodes never candidates


def _is_float(v: ir.Value | None) -> bool:
    return v is not None and (v.dtype is None or v.dtype == ir.DataType.FLOAT)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def analyze(model: ir.Model, *, per_channel: bool, exclude: Sequence[str], include_ops: Sequence[str] | None,
            target: str) -> Analysis:
    graph = model.graph
    infos: list[NodeInfo] = []
    skipped = []
    excl = set(exclude or ())
    for i, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{i}"
        info = NodeInfo(i, name, node.op_type, "float")
        infos.append(info)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in LEFT_FLOAT_REASONS:
            info.reason = LEFT_FLOAT_REASONS[op]
            continue
        if op not in WEIGHTED | INT8_OPS | SHARE_SCALE | FOLDABLE:
            if op == "BatchNormalization":
                info.reason = ("BatchNormalization stays float: it does not follow a Conv/Gemm it can be "
                               "folded into (see 'fold-batchnorm')")
            elif op not in _QUIET:
                info.reason = f"{op} has no fused int8 kernel on target {target!r}: stays float"
            continue
        if name in excl or op in excl:
            info.reason = "excluded by option 'exclude'"
            continue
        if include_ops is not None and op not in include_ops and op not in FOLDABLE:
            info.reason = "not in option 'include_ops'"
            continue
        if op in WEIGHTED:
            _classify_weighted(node, info, per_channel)
        elif op in FOLDABLE:
            if op == "Clip":
                lo = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
                if lo is None or float(np.asarray(lo)) != 0.0:
                    info.reason = "Clip with min != 0 cannot be folded into a Q range"
                    continue
            info.role = "fold"
        elif op in INT8_OPS:
            if not all(_is_float(v) for v in node.inputs if v is not None):
                info.reason = "non-float inputs"
                continue
            info.role = "int8"
        elif op in SHARE_SCALE:
            if not _is_float(node.inputs[0]):
                info.reason = "non-float input"
                continue
            info.role = "share"
    for info in infos:
        if info.role == "float" and info.reason:
            skipped.append((info.name, info.op_type, info.reason))
    return Analysis(infos, skipped)


def _classify_weighted(node: ir.Node, info: NodeInfo, per_channel: bool) -> None:
    op = node.op_type
    x = node.inputs[0]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wv = const_value(w)
    if not _is_float(x):
        info.reason = "non-float activation input"
        return
    if wv is None or wv.dtype != np.float32:
        if op == "MatMul":
            info.reason = "MatMul of two activations (attention) stays float: no constant weight to quantize"
        else:
            info.reason = f"{op} weight is not a float32 constant"
        return
    axis: int | None = None
    if op == "Conv":
        axis = 0
    elif op == "ConvTranspose":
        axis = 1 if _attr(node, "group", 1) == 1 else None
    elif op == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            info.reason = "Gemm with transA/alpha/beta is not fused by the int8 kernels"
            return
        axis = 0 if _attr(node, "transB", 0) else 1
    elif op == "MatMul":
        if wv.ndim < 2:
            info.reason = "MatMul with a 1-D weight"
            return
        axis = wv.ndim - 1
    info.role = "weighted"
    info.weight_input = 1
    info.weight_axis = axis if per_channel else None
    if op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = const_value(node.inputs[2])
        n_out = wv.shape[axis] if axis is not None else None
        if b is not None and b.ndim == 1 and (n_out is None or b.shape[0] == n_out):
            info.bias_input = 2


def select(model: ir.Model, analysis: Analysis, forced_float: set[int] = frozenset(), *,
           target: str = "cpu") -> set[int]:
    """Indices of the nodes to quantize (weighted ops, plus int8/share ops touching a quantized one)."""
    graph = model.graph
    nodes = list(graph)
    infos = analysis.infos
    pos = _Positions(nodes)
    chosen = {i.index for i in infos if i.role == "weighted" and i.index not in forced_float}
    if target == "tensorrt":
        # TensorRT: Q/DQ on the inputs of the ops it runs in int8; residual Adds next to them.
        for info in infos:
            if info.role == "int8" and info.op_type == "Add" and info.index not in forced_float:
                if _touches(nodes[info.index], chosen, pos):
                    chosen.add(info.index)
        return chosen
    candidates = {i.index for i in infos if i.role in ("int8", "share") and i.index not in forced_float}
    changed = True
    while changed:
        changed = False
        for idx in sorted(candidates - chosen):
            node = nodes[idx]
            info = infos[idx]
            if info.role == "share":
                # only inside an int8 region: quantized producer/consumer on the data path
                src = node.inputs[0].producer() if node.inputs[0] is not None else None
                src_q = src is not None and _index(src, pos) in chosen | _folded_into(src, chosen, pos, infos)
                dst_q = any(_index(c, pos) in chosen for c in node.outputs[0].consumers())
                if src_q and dst_q:
                    chosen.add(idx)
                    changed = True
            elif _touches(node, chosen, pos, infos):
                chosen.add(idx)
                changed = True
    return chosen


class _Positions(dict):
    """``id(node) -> index`` of the main graph's nodes (no state left on the nodes themselves)."""

    def __init__(self, nodes: list[ir.Node]):
        super().__init__((id(n), i) for i, n in enumerate(nodes))


def _index(node: ir.Node, pos: _Positions) -> int:
    """Position of ``node`` in the main graph, -1 for a node elsewhere (a subgraph)."""
    return pos.get(id(node), -1)


def _role(infos: list[NodeInfo], idx: int) -> str:
    return infos[idx].role if idx >= 0 else "float"


def _folded_into(node: ir.Node, chosen: set[int], pos: _Positions, infos) -> set[int]:
    """``{index of node}`` if ``node`` is a foldable activation right behind a chosen node."""
    if _role(infos, _index(node, pos)) != "fold":
        return set()
    src = node.inputs[0].producer() if node.inputs[0] is not None else None
    if src is not None and _index(src, pos) in chosen and len(node.inputs[0].uses()) == 1:
        return {_index(node, pos)}
    return set()


def _touches(node: ir.Node, chosen: set[int], pos: _Positions, infos=None) -> bool:
    for v in node.inputs:
        p = v.producer() if v is not None else None
        if p is None:
            continue
        pi = _index(p, pos)
        if pi in chosen or (infos is not None and _folded_into(p, chosen, pos, infos)):
            return True
    for out in node.outputs:
        for c in out.consumers():
            if _index(c, pos) in chosen:
                return True
            # through a foldable activation
            if infos is not None and _role(infos, _index(c, pos)) == "fold":
                for cc in c.outputs[0].consumers():
                    if _index(cc, pos) in chosen:
                        return True
    return False


# ------------------------------------------------------------------------------ planning


@dataclasses.dataclass
class Plan:
    """What to rewrite: quantized node indices, folded activations, per-tensor qparams sources."""

    chosen: set[int]
    folds: dict[int, int]  # activation node index -> producer node index it folds into
    calibrated: list[str]  # tensors whose range comes from calibration
    shared: list[tuple[str, str]]  # (output tensor, input tensor) of scale-sharing ops, in order
    constants: list[str]  # constant inputs of int8 ops, quantized from their values
    rewire_all: set[str]  # tensors produced by a quantized node: every reader reads the DQ
    quantized_consumers: dict[str, set[int]]  # tensor -> quantized node indices reading it
    int32_bias: bool = True  # onnxruntime's integer kernels want int32 bias; TensorRT keeps it float

    def tensor_order(self) -> list[str]:
        return list(dict.fromkeys(list(self.calibrated) + list(self.constants) + [o for o, _ in self.shared]))


def plan_tensors(model: ir.Model, analysis: Analysis, chosen: set[int], *, target: str) -> Plan:
    nodes = list(model.graph)
    pos = _Positions(nodes)
    infos = analysis.infos
    folds: dict[int, int] = {}
    calibrated: dict[str, None] = {}
    shared: list[tuple[str, str]] = []
    constants: dict[str, None] = {}
    rewire_all: set[str] = set()
    qcons: dict[str, set[int]] = {}
    trt = target == "tensorrt"

    def out_tensor(idx: int) -> str:
        """The tensor a quantized node's output Q sits on (after a folded activation)."""
        out = nodes[idx].outputs[0]
        uses = out.uses()
        if not trt and len(uses) == 1 and not out.is_graph_output():
            c = uses[0].node
            ci = _index(c, pos)
            if _role(infos, ci) == "fold":
                folds[ci] = idx
                return c.outputs[0].name
        return out.name

    for idx in sorted(chosen):
        node = nodes[idx]
        info = infos[idx]
        for j, v in enumerate(node.inputs):
            if v is None or not _is_float(v):
                continue
            if info.role == "weighted" and j in (info.weight_input, info.bias_input):
                continue
            if info.role == "share" and j != _DATA_INPUT:
                continue
            if info.op_type == "Resize" and j != 0:
                continue
            if trt and info.role == "int8":
                # TensorRT fuses Conv + residual Add: only the skip branch gets Q/DQ.
                p = v.producer()
                if p is not None and _role(infos, _index(p, pos)) == "weighted":
                    continue
            qcons.setdefault(v.name, set()).add(idx)
            if const_value(v) is not None:
                constants[v.name] = None
            elif info.role != "share":
                calibrated[v.name] = None
        if trt:
            continue
        if info.op_type in ("Gemm", "MatMul") and nodes[idx].outputs[0].is_graph_output():
            # Model outputs (logits) stay float: a uint8 Q on them erases the small differences
            # between classes; onnxruntime still fuses DQ -> Gemm/MatMul with a float output
            # (QGemm / MatMulIntegerToFloat).
            continue
        out = out_tensor(idx)
        rewire_all.add(out)
        if info.role == "share":
            shared.append((out, node.inputs[0].name))
        else:
            calibrated[out] = None
    # inputs of share ops that are not produced by a quantized node need their own range
    produced = set(rewire_all)
    for out, src in shared:
        if src not in produced and src not in calibrated:
            calibrated[src] = None
    return Plan(set(chosen), folds, list(calibrated), shared, list(constants), rewire_all, qcons, int32_bias=not trt)


# ------------------------------------------------------------------------------ rewrite


def _np(a: np.ndarray, name: str) -> ir.Tensor:
    # np.ascontiguousarray turns a 0-d array into shape (1,): a per-tensor scale / zero point must stay
    # a scalar, or onnxruntime's QDQ selectors refuse QLinearAdd/QLinearMul (they did: residual Adds
    # ran in float between DQ and Q) while QLinearConv happens to accept (1,).
    a = np.asarray(a)
    return ir.tensor(np.ascontiguousarray(a).reshape(a.shape), name=name)


class _Builder:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.taken: set[str] = set()
        for n in graph:
            for o in n.outputs:
                if o.name:
                    self.taken.add(o.name)
            if n.name:
                self.taken.add(n.name)
        for v in list(graph.inputs) + list(graph.initializers.values()):
            if v.name:
                self.taken.add(v.name)

    def name(self, base: str) -> str:
        return unique_name(self.graph, base, taken=self.taken)

    def init(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.name(base)
        self.taken.add(name)
        v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=_np(array, name))
        self.graph.register_initializer(v)
        return v

    def qparam_inits(self, base: str, qp: QParams) -> tuple[ir.Value, ir.Value]:
        return self.init(base + "_scale", qp.scale), self.init(base + "_zero_point", qp.zero_point)

    def node(self, op: str, inputs: list[ir.Value], base: str, attrs: dict | None = None) -> ir.Node:
        n = ir.node(op, inputs, attributes=attrs or {}, name=self.name(base), num_outputs=1)
        self.taken.add(n.name)
        out = n.outputs[0]
        out.name = self.name(base + "_out")
        self.taken.add(out.name)
        return n


def apply_plan(model: ir.Model, plan: Plan, qparams: dict[str, QParams], *, analysis: Analysis,
               stats: PassStats | None = None) -> None:
    """Rewrite ``model`` in place according to ``plan`` (node indices refer to ``model``'s order)."""
    graph = model.graph
    nodes = list(graph)
    by_name = _values_by_name(graph)
    b = _Builder(graph)
    infos = analysis.infos
    qparams = dict(qparams)
    rewire = set(plan.rewire_all)
    order = plan.tensor_order()

    # 1. fold activations: readers of the activation's output read the producer's output instead.
    for act_idx, prod_idx in sorted(plan.folds.items()):
        act = nodes[act_idx]
        if prod_idx not in plan.chosen:
            continue
        src = act.inputs[0]
        dst = act.outputs[0]
        name = dst.name
        if dst.is_graph_output():
            for k, o in enumerate(graph.outputs):
                if o is dst:
                    graph.outputs[k] = src
            dst.name = None
            src.name = name
        dst.replace_all_uses_with(src)
        graph.remove(act, safe=True)
        # the activation output's qparams now describe ``src`` (renamed or not)
        if src.name != name:
            qparams[src.name] = qparams[name]
            order = [src.name if t == name else t for t in order]
            if name in rewire:
                rewire.add(src.name)
        if stats:
            stats.count("activations_folded")
    by_name = _values_by_name(graph)

    # 2. activation Q/DQ pairs
    chosen_nodes = {id(nodes[i]) for i in plan.chosen}
    for tname in dict.fromkeys(order):
        v = by_name.get(tname)
        if v is None or tname not in qparams:
            continue
        qp = qparams[tname]
        rewire_all = tname in rewire
        readers = [(u.node, u.idx) for u in v.uses() if rewire_all or id(u.node) in chosen_nodes]
        if not readers and not (rewire_all and v.is_graph_output()):
            continue
        s, z = b.qparam_inits(tname, qp)
        q = b.node("QuantizeLinear", [v, s, z], tname + "_QuantizeLinear")
        q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(qp.dtype))
        q.outputs[0].shape = v.shape
        # One DQ per reading node: onnxruntime's QDQ selectors group a node with DQs that feed
        # only it (a DQ shared by a Conv and a residual Add left the Add unfused).
        groups: dict[int, list[tuple[ir.Node, int]]] = {}
        for node, idx in readers:
            groups.setdefault(id(node), []).append((node, idx))
        if rewire_all and v.is_graph_output():
            groups.setdefault(0, [])
        dqs = []
        for key, reads in groups.items():
            dq = b.node("DequantizeLinear", [q.outputs[0], s, z], tname + "_DequantizeLinear")
            dq.outputs[0].type = v.type
            dq.outputs[0].shape = v.shape
            dqs.append(dq)
            for node, idx in reads:
                node.replace_input_with(idx, dq.outputs[0])
            if key == 0:
                name = v.name
                for k, o in enumerate(graph.outputs):
                    if o is v:
                        graph.outputs[k] = dq.outputs[0]
                v.name = b.name(name + "_float")
                dq.outputs[0].name = name
        producer = v.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, [q, *dqs])
        elif readers:
            graph.insert_before(_first_in(graph, [r for r, _ in readers]), [q, *dqs])
        else:
            graph.append([q, *dqs])
        if stats:
            stats.count("qdq_pairs")

    # 3. weights and biases. An int32 bias needs ``b / (s_x * s_w)`` inside the int32 range: first the
    # floor that puts on each weight's scale (max over the nodes sharing the weight), then the weights.
    floors: dict[tuple[str, int | None], np.ndarray] = {}
    for idx in sorted(plan.chosen):
        info = infos[idx]
        node = nodes[idx]
        if info.role != "weighted" or info.bias_input is None or not plan.int32_bias:
            continue
        x_scale = _dq_scale(node.inputs[0])
        if x_scale is None:
            continue
        key = (node.inputs[info.weight_input].name, info.weight_axis)
        floor = weight_scale_floor(const_value(node.inputs[info.bias_input]), x_scale,
                                   per_channel=info.weight_axis is not None)
        floors[key] = floor if key not in floors else np.maximum(floors[key], floor)
    # 7-bit weights behind a uint8 input centred away from 0 (onnxruntime's u8s8 kernels would
    # saturate int16 pair sums there; see qmath.u8s8_saturation_risk). Only for onnxruntime's
    # integer kernels (int32 bias), over every node sharing the weight.
    reduced: set[tuple[str, int | None]] = set()
    if plan.int32_bias:
        for idx in sorted(plan.chosen):
            info = infos[idx]
            node = nodes[idx]
            if info.role == "weighted" and u8s8_saturation_risk(_dq_zero_point(node.inputs[0])):
                reduced.add((node.inputs[info.weight_input].name, info.weight_axis))
    w_cache: dict[tuple[str, int | None], ir.Value] = {}
    for idx in sorted(plan.chosen):
        info = infos[idx]
        node = nodes[idx]
        if info.role != "weighted":
            continue
        w = node.inputs[info.weight_input]
        axis = info.weight_axis
        key = (w.name, axis)
        if key not in w_cache:
            wv = const_value(w)
            qmax = WEIGHT_QMAX_REDUCED if key in reduced else WEIGHT_QMAX
            wq, wqp = quantize_weight(wv, axis, floors.get(key), qmax)
            if key in reduced and stats:
                stats.count("weights_7bit")
                stats.note(f"{node.name}: 7-bit weights (its uint8 input's zero point is high; 8-bit would "
                           "saturate onnxruntime's u8s8 int16 sums on CPUs without VNNI)")
            raised = _raised_channels(wv, axis, wqp, qmax)
            if raised and stats:
                stats.count("weight_scales_raised_for_bias", raised)
                stats.note(f"{node.name}: weight scale raised on {raised} channel(s) so the int32 bias fits "
                           "(weights tiny next to the bias, e.g. after 'reconstruct')")
            qw = b.init(w.name + "_quantized", wq)
            s, z = b.qparam_inits(w.name, wqp)
            attrs = {"axis": axis} if axis is not None else {}
            dq = b.node("DequantizeLinear", [qw, s, z], w.name + "_DequantizeLinear", attrs)
            dq.outputs[0].type = w.type
            dq.outputs[0].shape = w.shape
            dq.meta["qparams"] = wqp
            w_cache[key] = dq.outputs[0]
            graph.insert_before(node, dq)
            if stats:
                stats.count("weights_int8")
        wdq = w_cache[key]
        node.replace_input_with(info.weight_input, wdq)
        if info.bias_input is not None and plan.int32_bias:
            x_scale = _dq_scale(node.inputs[0])
            if x_scale is None:
                continue
            bias = node.inputs[info.bias_input]
            bq, bqp = quantize_bias(const_value(bias), x_scale, wdq.producer().meta["qparams"])
            qb = b.init(bias.name + "_quantized", bq)
            s, z = b.qparam_inits(bias.name, bqp)
            attrs = {"axis": 0} if bqp.axis is not None else {}
            dq = b.node("DequantizeLinear", [qb, s, z], bias.name + "_DequantizeLinear", attrs)
            dq.outputs[0].type = bias.type
            dq.outputs[0].shape = bias.shape
            graph.insert_before(node, dq)
            node.replace_input_with(info.bias_input, dq.outputs[0])
            if stats:
                stats.count("biases_int32")
    # 4. drop float initializers nobody reads any more
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del graph.initializers[name]
    graph.sort()


def _dq_scale(x: ir.Value | None) -> np.ndarray | None:
    """The scale of the DequantizeLinear producing ``x`` (None if ``x`` is not dequantized)."""
    p = x.producer() if x is not None else None
    if p is None or p.op_type != "DequantizeLinear":
        return None
    return const_value(p.inputs[1])


def _dq_zero_point(x: ir.Value | None) -> np.ndarray | None:
    """The zero point of the DequantizeLinear producing ``x`` (None if there is none)."""
    p = x.producer() if x is not None else None
    if p is None or p.op_type != "DequantizeLinear" or len(p.inputs) < 3 or p.inputs[2] is None:
        return None
    return const_value(p.inputs[2])


def _raised_channels(w: np.ndarray, axis: int | None, qp: QParams, qmax: int = WEIGHT_QMAX) -> int:
    """How many channels of ``w`` got a scale above ``max|w| / qmax`` (the int32-bias floor)."""
    natural = weight_qparams(w, axis, qmax=qmax).scale
    return int(np.count_nonzero(qp.scale > natural))


def _first_in(graph: ir.Graph, candidates: list[ir.Node]) -> ir.Node:
    ids = {id(c) for c in candidates}
    for n in graph:
        if id(n) in ids:
            return n
    return candidates[0]


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    out: dict[str, ir.Value] = {}
    for v in graph.inputs:
        out[v.name] = v
    for name, v in graph.initializers.items():
        out[name] = v
    for n in graph:
        for o in n.outputs:
            if o.name:
                out[o.name] = o
    return out




# ------------------------------------------------------------------------------ the pass


def upgrade_opset(model: ir.Model, version: int, stats: PassStats) -> bool:
    """Convert the model to ``version`` in place (onnxscript's version converter); True on success."""
    old = opset_version(model) or 0
    try:
        from onnxscript import version_converter

        version_converter.convert_version(model, version, fallback=True)
    except Exception as e:  # the converter refuses some models; the caller falls back to per-tensor
        stats.note(f"opset upgrade {old} -> {version} failed ({type(e).__name__}: {e})")
        return False
    if (opset_version(model) or 0) < version:
        stats.note(f"opset upgrade {old} -> {version} did not take effect")
        return False
    model.ir_version = max(model.ir_version or 0, 7)
    stats.note(f"upgraded opset {old} -> {version}: per-channel DequantizeLinear needs opset >= 13")
    stats.count("opset_upgraded")
    return True


@dataclasses.dataclass
class QuantContext:
    """Everything one run learns before rewriting; lets fallback/guard build candidate models."""

    float_bytes: bytes
    analysis: Analysis
    ranges: dict[str, tuple[float, float]]
    act_dtype: np.dtype
    symmetric: bool
    target: str
    feeds: list[dict[str, np.ndarray]]

    def fresh(self) -> ir.Model:
        import onnx

        return ir.serde.deserialize_model(onnx.load_from_string(self.float_bytes))

    def qparams_for(self, model: ir.Model, plan: Plan) -> dict[str, QParams]:
        by_name = _values_by_name(model.graph)
        qps: dict[str, QParams] = {}
        for t in plan.calibrated:
            if t in self.ranges:
                lo, hi = self.ranges[t]
                qps[t] = activation_qparams(lo, hi, self.act_dtype, self.symmetric)
        for t in plan.constants:
            arr = const_value(by_name[t])
            qps[t] = activation_qparams(float(arr.min()), float(arr.max()), self.act_dtype, self.symmetric)
        for out, src in plan.shared:
            if src in qps:
                qps[out] = qps[src]
        return qps

    def build(self, chosen: set[int], stats: PassStats | None = None, model: ir.Model | None = None) -> ir.Model:
        """Quantize ``chosen`` (node indices) into ``model`` (default: a fresh float copy)."""
        model = model if model is not None else self.fresh()
        plan = plan_tensors(model, self.analysis, chosen, target=self.target)
        qps = self.qparams_for(model, plan)
        apply_plan(model, plan, qps, analysis=self.analysis, stats=stats)
        return model


@register_pass("quantize-int8")
class QuantizeInt8Pass(Pass):
    """Static int8 quantization in QDQ form (QuantizeLinear/DequantizeLinear), calibrated from data.

    Rewrites Conv, ConvTranspose, Gemm, MatMul (constant weights) to read int8 weights through
    ``DequantizeLinear`` (symmetric, per output channel by default; bias int32 with
    ``scale = x_scale * w_scale``), and puts ``QuantizeLinear -> DequantizeLinear`` on the float
    activations of every quantized op (its inputs and its output), so the runtime fuses each
    ``DQ -> op -> Q`` region into one integer kernel (QLinearConv, QLinearMatMul, QGemm,
    QLinearAdd, ...). Add/Mul/Concat/pooling are quantized inside int8 regions; Reshape/Transpose/
    Flatten/MaxPool/Resize share their input's scale; Relu and Clip(0, m) are folded into the
    preceding Q range (uint8 saturation at the zero point *is* the ReLU). Softmax, LayerNorm, Gelu,
    HardSwish and anything unknown stay float, with no Q/DQ around them.

    Math: ``q = saturate(round_half_even(x / s) + z)``, ``x' = (q - z) * s``. Activations:
    ``cpu`` uint8 asymmetric ``s = (hi - lo) / 255, z = round(-lo / s)`` (U8S8 with int8 weights);
    ``tensorrt`` int8 symmetric ``s = max|x| / 127, z = 0`` with Q/DQ only on the inputs of the
    ops TensorRT runs in int8 (it fuses outputs itself; bias stays float). ``[lo, hi]`` comes from
    ``calibration``: ``minmax``, ``percentile`` or ``entropy`` (TensorRT's KL method).

    Lossy: per tensor at most ``s / 2`` rounding error inside ``[lo, hi]``, saturation outside.
    ``max_drop`` (1 - cosine of the outputs, or the drop of ``context.options['metric']`` on
    ``eval_data``) keeps the most sensitive nodes float until the budget holds; ``latency_guard``
    keeps int8 only for the op types measured faster, and the model float if int8 is not faster.

    ``fold_batchnorm`` (default on) first folds every BatchNormalization that follows a Conv/Gemm
    into it (the lossless ``fold-batchnorm`` pass): a float BatchNorm between a QLinearConv and its
    activation breaks the int8 region (Q/DQ and NHWC<->NCHW Transposes around every conv).

    Needs calibration data (``PassContext.calibration_data``) and opset >= 13 for per-channel
    weights: older models are upgraded (onnxscript's version converter) or, if that fails,
    quantized per-tensor (reported).
    """

    lossless = False
    tolerance = 0.1

    def __init__(
        self,
        calibration: Literal["minmax", "percentile", "entropy"] = "percentile",
        percentile: float = 99.99,
        per_channel: bool = True,
        activation_type: Literal["auto", "uint8", "int8"] = "auto",
        exclude: list[str] | None = None,
        include_ops: list[str] | None = None,
        num_samples: int | None = None,
        max_drop: float | None = None,
        latency_guard: bool = False,
        fold_batchnorm: bool = True,
    ):
        super().__init__()
        if calibration not in cal.METHODS:
            raise ValueError(f"calibration must be one of {', '.join(cal.METHODS)}, got {calibration!r}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        if activation_type not in ("auto", "uint8", "int8"):
            raise ValueError(f"activation_type must be auto, uint8 or int8, got {activation_type!r}")
        if max_drop is not None and max_drop < 0:
            raise ValueError(f"max_drop must be >= 0, got {max_drop}")
        self.calibration = calibration
        self.percentile = percentile
        self.per_channel = per_channel
        self.activation_type = activation_type
        self.exclude = list(exclude or [])
        self.include_ops = list(include_ops) if include_ops else None
        self.num_samples = num_samples
        self.max_drop = max_drop
        self.latency_guard = latency_guard
        self.fold_batchnorm = fold_batchnorm

    def requires(self, model: ir.Model) -> None:
        data = self.context.calibration_data
        if data is None:
            raise CalibrationDataError(
                f"pass {self.name!r} needs calibration data: pass representative inputs with "
                "--calibration-data FILE.npz|DIR (CLI) or PassContext(calibration_data=...) (API); "
                "CalibrationData.synthetic(model, n) works but calibrates on noise"
            )
        try:
            if len(data) == 0:
                raise CalibrationDataError(f"pass {self.name!r}: the calibration data is empty")
        except TypeError:
            pass
        if getattr(data, "synthetic", False):
            logger.warning("quantize-int8 is calibrating on SYNTHETIC data: ranges will not match real inputs")

    # -------------------------------------------------------------------------------------
    def _dtype(self) -> tuple[np.dtype, bool]:
        target = self.context.target
        if target == "tensorrt":
            if self.activation_type == "uint8":
                raise PassOptionError("quantize-int8: TensorRT needs int8 activations; drop activation_type=uint8")
            return np.dtype(np.int8), True
        if self.activation_type == "int8":
            return np.dtype(np.int8), False
        return np.dtype(np.uint8), False

    def _fold_batchnorm(self, model: ir.Model, stats: PassStats) -> None:
        """Fold BatchNormalization into the Conv/Gemm before it (the lossless ``fold-batchnorm``).

        A BatchNorm left between a Conv and its activation keeps ``Conv -> Q | DQ -> BN -> Clip -> Q``
        apart: onnxruntime runs QLinearConv in NHWC and the float BatchNorm in NCHW, so every conv
        pays a Q/DQ pair and two Transposes (mobilenetv2_style: 74 Transposes, int8 slower than fp32).
        """
        if not any(n.op_type == "BatchNormalization" for n in model.graph):
            return
        from onnxforge.passes.registry import create_pass

        result = create_pass("fold-batchnorm", {}, self.context)(model)
        n = result.stats.counts.get("batchnorm_folded", 0)
        if n:
            stats.count("batchnorm_folded", n)
            stats.note(f"folded {n} BatchNormalization node(s) into the preceding Conv/Gemm before quantizing "
                       "(option fold_batchnorm)")

    def prepare(self, model: ir.Model, stats: PassStats) -> QuantContext:
        if self.fold_batchnorm:
            self._fold_batchnorm(model, stats)
        per_channel = self.per_channel
        version = opset_version(model) or 0
        if version < 13:
            if not upgrade_opset(model, 13, stats):
                if version < 10:
                    raise UnsupportedModelError(
                        f"quantize-int8: opset {version} has no QuantizeLinear and the upgrade to 13 failed"
                    )
                if per_channel:
                    per_channel = False
                    stats.note(f"opset {version} < 13: weights quantized per-tensor (per-channel needs opset 13)")
        act_dtype, symmetric = self._dtype()
        target = self.context.target
        analysis = analyze(model, per_channel=per_channel, exclude=self.exclude, include_ops=self.include_ops,
                           target=target)
        n = self.num_samples or self.context.options.get("num_samples")
        feeds = cal.iter_feeds(self.context.calibration_data, n)
        if not feeds:
            raise CalibrationDataError(f"pass {self.name!r}: the calibration data is empty")
        # calibrate every float tensor around every candidate node, so any subset can be built
        nodes = list(model.graph)
        names: dict[str, None] = {}
        for info in analysis.infos:
            if info.role == "float":
                continue
            node = nodes[info.index]
            for j, v in enumerate(node.inputs):
                if info.role == "weighted" and j in (info.weight_input, info.bias_input):
                    continue
                if v is not None and _is_float(v) and const_value(v) is None:
                    names[v.name] = None
            for o in node.outputs:
                if _is_float(o):
                    names[o.name] = None
        ranges, skipped = cal.collect_ranges(
            model, feeds, list(names), method=self.calibration, percentile=self.percentile,
            providers=self.context.providers, full_range=[o.name for o in model.graph.outputs],
        )
        for name, why in skipped.items():
            stats.note(f"tensor {name!r} not calibrated: {why}")
        blob = ir.serde.serialize_model(model).SerializeToString()
        return QuantContext(blob, analysis, ranges, act_dtype, symmetric, target, feeds)

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        self.requires(model)
        if not isinstance(model.graph, ir.Graph):
            raise UnsupportedModelError("quantize-int8 needs a model with a main graph")
        qc = self.prepare(model, stats)
        analysis = qc.analysis
        for name, op, reason in analysis.skipped:
            stats.skipped.append(Skip(name, op, reason))
        # nodes in subgraphs are not quantized (calibration cannot see their values reliably)
        for g in _subgraph_nodes(model):
            stats.skip(g, "inside an If/Loop/Scan subgraph: left float")
        forced: set[int] = set()
        chosen = select(model, analysis, forced, target=qc.target)
        # a node whose tensors could not be calibrated stays float
        for _ in range(3):
            plan = plan_tensors(model, analysis, chosen, target=qc.target)
            missing = [t for t in plan.calibrated if t not in qc.ranges]
            if not missing:
                break
            for t in missing:
                for idx in plan.quantized_consumers.get(t, ()):
                    forced.add(idx)
                for idx in chosen:
                    if any(o.name == t for o in list(model.graph)[idx].outputs):
                        forced.add(idx)
            chosen = select(model, analysis, forced, target=qc.target)
        not_paying = [i for i in analysis.infos if i.role in ("int8", "share") and i.index not in chosen]
        for info in not_paying:
            stats.skipped.append(Skip(info.name, info.op_type,
                                      "no quantized neighbour: an isolated int8 op costs more Q/DQ than it saves"))
        if self.max_drop is not None:
            from onnxforge.passes.quantize.fallback import accuracy_fallback

            chosen = accuracy_fallback(self, qc, chosen, stats)
        if self.latency_guard:
            from onnxforge.passes.quantize.fallback import latency_guard

            chosen = latency_guard(self, qc, chosen, stats)
        if not chosen:
            stats.note("nothing quantized: the model stays float")
            return bool(stats.counts.get("opset_upgraded") or stats.counts.get("batchnorm_folded"))
        for info in analysis.infos:
            if info.index in chosen:
                stats.count(f"quantized_{info.op_type}")
        stats.details["quantized_nodes"] = sorted(analysis.infos[i].name for i in chosen)
        stats.details["activation_type"] = str(qc.act_dtype)
        stats.details["calibration"] = self.calibration
        qc.build(chosen, stats, model=model)
        return True


def _subgraph_nodes(model: ir.Model) -> list[ir.Node]:
    out = []
    for node in model.graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                out.extend(ir.traversal.RecursiveGraphIterator(attr.value))
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    out.extend(ir.traversal.RecursiveGraphIterator(g))
    return out
