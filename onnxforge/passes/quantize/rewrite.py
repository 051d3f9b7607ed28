"""Rewriting for ``quantize-int8``: apply a :class:`~.plan.Plan` to the graph.

Activations get ``QuantizeLinear -> DequantizeLinear`` (one DQ per reading node, so onnxruntime's
QDQ selectors can group it with that node); weights are stored as int8 initializers behind a
``DequantizeLinear`` (per channel where the plan says so), biases as int32 with
``s_b = s_x * s_w``; folded activations are removed (the Q's saturation implements them).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value, opset_version, unique_name
from onnxforge.passes.base import PassStats
from onnxforge.passes.quantize.analysis import Analysis
from onnxforge.passes.quantize.plan import Plan
from onnxforge.passes.quantize.qmath import (
    WEIGHT_QMAX,
    WEIGHT_QMAX_REDUCED,
    QParams,
    quantize_bias,
    quantize_weight,
    u8s8_saturation_risk,
    weight_qparams,
    weight_scale_floor,
)

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

    # 2b. rescales (x / c, x * c): readers of the output read the input's Q with the scale times c^-1/c.
    # 2c. HardSigmoid / HardSwish: expanded into integer ops (no int8 kernel of their own).
    for idx in sorted(plan.chosen):
        info = infos[idx]
        if info.role == "rescale":
            _eliminate_rescale(graph, nodes[idx], info, b, stats)
        elif info.hard_sigmoid is not None:
            _expand_hard_sigmoid(graph, nodes[idx], info, b, stats)

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
    if plan.int32_bias and plan.reduce_range:
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
            floor = floors.get(key)
            fitted = plan.weight_scales.get(w.name)
            if fitted is not None and axis is not None and np.shape(fitted) == (wv.shape[axis],):
                # the weight is already on the grid of this scale (.gptq): keep it, so the integers are
                # the fitted ones (a larger floor from the bias would re-round it, still correct)
                floor = fitted if floor is None else np.maximum(floor, fitted)
            wq, wqp = quantize_weight(wv, axis, floor, qmax)
            if key in reduced and stats:
                stats.count("weights_7bit")
                stats.note(f"{node.name}: 7-bit weights (its uint8 input's zero point is high; 8-bit would "
                           "saturate onnxruntime's u8s8 int16 sums on this CPU path, see details['isa'])")
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
    # 3b. a weighted node left float stays float at run time (see _keep_float). Only for onnxruntime's
    # integer kernels (TensorRT takes per-tensor activation Q/DQ only, and reads float layers itself),
    # and from opset 13, where DequantizeLinear has an axis.
    shield = plan.int32_bias and (opset_version(model) or 0) >= 13
    for idx, node in enumerate(nodes):
        if idx not in plan.chosen and node.graph is graph and shield:
            if _keep_float(node, b) and stats:
                stats.count("float_nodes_shielded")
    # 4. drop float initializers nobody reads any more
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del graph.initializers[name]
    graph.sort()


def _keep_float(node: ir.Node, b: _Builder) -> bool:
    """Read a float Conv/ConvTranspose/Gemm's input through a per-axis DequantizeLinear; True if changed.

    onnxruntime's ``WeightBiasQuantization`` (graph level 1, on in every session that optimizes)
    takes a Conv/ConvTranspose/Gemm whose input comes from a per-tensor DequantizeLinear and whose
    output leads to a QuantizeLinear, and quantizes its **float** weight itself: per tensor,
    asymmetric int8. A node that ``max_drop``, the latency guard or ``exclude`` kept float ran as a
    worse int8 node than the one it replaced (rapid/YOLOX ``Conv_44`` kept float: per-tensor int8
    weights at run time; depthwise convs, whose channels differ by orders of magnitude, broke).
    The transformer needs a scalar input scale, so the float node's own DQ (one per reading node,
    step 2) gets its scale and zero point repeated along the channel axis: the same values, per axis.
    """
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 2:
        return False
    parts = _dq_parts(node.inputs[0])
    w = const_value(node.inputs[1])
    if parts is None or w is None or len(node.inputs[0].uses()) != 1:
        return False
    dq, scale, zp = parts
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        trans_b = node.attributes.get("transB")
        axis = 0 if trans_a is not None and int(trans_a.value) else 1
        channels = w.shape[1] if trans_b is not None and int(trans_b.value) else w.shape[0]
    else:
        axis = 1
        group = node.attributes.get("group")
        g = int(group.value) if group is not None else 1
        channels = w.shape[0] if node.op_type == "ConvTranspose" else w.shape[1] * g
    name = dq.outputs[0].name or "float_input"
    s = b.init(name + "_per_axis_scale", np.full((channels,), float(scale.reshape(-1)[0]), np.float32))
    z = b.init(name + "_per_axis_zero_point", np.full((channels,), zp.reshape(-1)[0], zp.dtype))
    dq.replace_input_with(1, s)
    dq.replace_input_with(2, z)
    dq.attributes["axis"] = ir.AttrInt64("axis", axis)
    return True


def _dq_parts(v: ir.Value | None) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """``(dq, scale, zero_point)`` of the per-tensor DequantizeLinear producing ``v``, else None."""
    p = v.producer() if v is not None else None
    if p is None or p.op_type != "DequantizeLinear" or len(p.inputs) < 3 or p.inputs[2] is None:
        return None
    scale, zp = const_value(p.inputs[1]), const_value(p.inputs[2])
    if scale is None or zp is None or scale.size != 1:
        return None
    return p, scale, zp


def _dq_per_reader(graph: ir.Graph, b: _Builder, out: ir.Value, q: ir.Value, scale: np.ndarray,
                   zp: np.ndarray, after: ir.Node) -> None:
    """Every reader of ``out`` reads its own ``DequantizeLinear(q, scale, zp)`` (one per reading node,
    as onnxruntime's QDQ selectors want); a graph output ``out`` becomes such a DQ under its name."""
    s = b.init(out.name + "_rescaled_scale", np.asarray(scale, np.float32).reshape(()))
    z = b.init(out.name + "_rescaled_zero_point", np.asarray(zp).reshape(()))
    new: list[ir.Node] = []
    readers: dict[int, list[tuple[ir.Node, int]]] = {}
    for u in out.uses():
        readers.setdefault(id(u.node), []).append((u.node, u.idx))
    for reads in readers.values():
        dq = b.node("DequantizeLinear", [q, s, z], out.name + "_DequantizeLinear")
        dq.outputs[0].type, dq.outputs[0].shape = out.type, out.shape
        for node, i in reads:
            node.replace_input_with(i, dq.outputs[0])
        new.append(dq)
    if out.is_graph_output():
        dq = b.node("DequantizeLinear", [q, s, z], out.name + "_DequantizeLinear")
        dq.outputs[0].type, dq.outputs[0].shape = out.type, out.shape
        for k, o in enumerate(graph.outputs):
            if o is out:
                graph.outputs[k] = dq.outputs[0]
        name = out.name
        out.name = b.name(name + "_float")
        dq.outputs[0].name = name
        new.append(dq)
    graph.insert_after(after, new)


def _eliminate_rescale(graph: ir.Graph, node: ir.Node, info, b: _Builder, stats: PassStats | None) -> None:
    """``y = x * f`` with ``x = DQ(q, s, z)``: readers of ``y`` read ``DQ(q, s * f, z)``; the node goes.

    Exact in real arithmetic (``(q - z) * s * f``); in fp32 one rounding of ``s * f``. Left as a float
    node (still correct) if its input is not dequantized per tensor."""
    parts = _dq_parts(node.inputs[info.data_input])
    if parts is None:
        if stats:
            stats.skip(node, "rescale left float: its input is not a per-tensor DequantizeLinear")
        return
    dq, scale, zp = parts
    out = node.outputs[0]
    _dq_per_reader(graph, b, out, dq.inputs[0], np.asarray(scale, np.float32) * np.float32(info.factor), zp, node)
    graph.remove(node, safe=True)
    if not dq.outputs[0].uses():
        graph.remove(dq, safe=True)
    if stats:
        stats.count("rescales_folded_into_scale")


def _expand_hard_sigmoid(graph: ir.Graph, node: ir.Node, info, b: _Builder, stats: PassStats | None) -> None:
    """HardSigmoid ``h = clip(a x + c, 0, 1)`` as ``a * clip(x + c/a, 0, 1/a)`` on integers.

    ``QLinearAdd(x, c/a)`` with its output Q on ``[0, 1/a]`` (scale ``1 / (255 a)``, zero point 0:
    the saturation *is* the clip), read back through a DQ with scale ``1/255`` (the ``* a``): ``h`` on
    256 levels of ``[0, 1]``. HardSwish ``x * h`` adds a ``QLinearMul``. Lossy like every int8 op:
    ``h`` within ``1/510`` of the float value.
    """
    alpha, beta = info.hard_sigmoid
    x_parts = _dq_parts(node.inputs[0])
    out = node.outputs[0]
    q_out = [u.node for u in out.uses() if u.node.op_type == "QuantizeLinear"]
    if x_parts is None:
        if stats:
            stats.skip(node, f"{node.op_type} left float: its input is not a per-tensor DequantizeLinear")
        return
    dq_x, xs, xz = x_parts
    c = float(beta / alpha)  # > 0 (analysis refuses others): exactly 255 * (c / 255)
    c_val = b.init(out.name + "_offset_quantized", np.asarray(255, np.uint8).reshape(()))
    c_s = b.init(out.name + "_offset_scale", np.asarray(c / 255.0, np.float32).reshape(()))
    c_z = b.init(out.name + "_offset_zero_point", np.asarray(0, np.uint8).reshape(()))
    c_dq = b.node("DequantizeLinear", [c_val, c_s, c_z], out.name + "_offset_DequantizeLinear")
    add = b.node("Add", [node.inputs[0], c_dq.outputs[0]], out.name + "_hard_sigmoid_Add")
    t_s = b.init(out.name + "_clip_scale", np.asarray(1.0 / (255.0 * alpha), np.float32).reshape(()))
    t_z = b.init(out.name + "_clip_zero_point", np.asarray(0, np.uint8).reshape(()))
    q_t = b.node("QuantizeLinear", [add.outputs[0], t_s, t_z], out.name + "_clip_QuantizeLinear")
    q_t.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
    h_s = b.init(out.name + "_hard_sigmoid_scale", np.asarray(1.0 / 255.0, np.float32).reshape(()))
    new = [c_dq, add, q_t]
    if node.op_type == "HardSigmoid":
        # readers of h read DQ(q_t, 1/255, 0) directly; the calibrated Q/DQ on h is bypassed
        graph.insert_before(node, new)
        for q in q_out:
            for dq in [u.node for u in q.outputs[0].uses()]:
                dq.replace_input_with(0, q_t.outputs[0])
                dq.replace_input_with(1, h_s)
                dq.replace_input_with(2, t_z)
            graph.remove(q, safe=True)
        if out.uses() or out.is_graph_output():
            _dq_per_reader(graph, b, out, q_t.outputs[0], np.float32(1.0 / 255.0), np.uint8(0), q_t)
    else:
        dq_h = b.node("DequantizeLinear", [q_t.outputs[0], h_s, t_z], out.name + "_hard_sigmoid_DequantizeLinear")
        dq_x2 = b.node("DequantizeLinear", list(dq_x.inputs), out.name + "_x_DequantizeLinear")
        dq_x2.outputs[0].type, dq_x2.outputs[0].shape = dq_x.outputs[0].type, dq_x.outputs[0].shape
        mul = b.node("Mul", [dq_x2.outputs[0], dq_h.outputs[0]], out.name + "_hard_swish_Mul")
        new += [dq_h, dq_x2, mul]
        graph.insert_before(node, new)
        out.replace_all_uses_with(mul.outputs[0])
        if out.is_graph_output():
            for k, o in enumerate(graph.outputs):
                if o is out:
                    graph.outputs[k] = mul.outputs[0]
            name = out.name
            out.name = b.name(name + "_replaced")
            mul.outputs[0].name = name
    graph.remove(node, safe=True)
    if stats:
        stats.count(f"{node.op_type}_expanded_int8")


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

