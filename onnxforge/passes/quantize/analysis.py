"""Analysis and selection for ``quantize-int8``: which nodes can run in int8, and which to quantize.

:func:`analyze` classifies every main-graph node by its *role*:

* ``weighted``: Conv, ConvTranspose, Gemm, MatMul with a constant float weight (QLinearConv,
  QLinearMatMul, QGemm after onnxruntime's QDQ fusion);
* ``int8``: an op onnxruntime runs on int8 tensors with its own output scale (QLinearAdd/Mul,
  QLinearConcat, QLinearAveragePool/GlobalAveragePool, QLinearSigmoid, QLinearLeakyRelu,
  QLinearSoftmax), decided op type by op type by :mod:`.kernels`;
* ``share``: data movement onnxruntime runs on uint8 with the input's scale (MaxPool, Resize,
  Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice, ...): its QDQ pair is dropped;
* ``fold``: Relu and Clip(min=0), implemented by the saturation of the producer's output Q;
* ``dynamic`` (CPU): LSTM with constant weights, rewritten as onnxruntime's DynamicQuantizeLSTM
  (:mod:`.recurrent`): int8 weights, activations quantized by the kernel, no Q/DQ at its edges;
* ``float``: everything else, with a reason.

:func:`select` picks the nodes to quantize: weighted and dynamic ops always; the others only when they
touch a quantized (weighted, int8 or share) neighbour, because a lone QLinearAdd surrounded by float ops costs more Q/DQ than it
saves. :func:`regions` groups the chosen nodes into connected int8 regions (the unit of the latency
guard).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value
from onnxforge.passes.quantize.recurrent import RECURRENT
from onnxforge.passes.quantize.recurrent import not_quantizable as lstm_not_quantizable

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# onnxruntime CPU: ops with an int8 kernel (own output scale); kept where .kernels measures a gain.
# HardSwish/HardSigmoid have no kernel: they are expanded into QLinearAdd (+ QLinearMul), see .rewrite.
INT8_OPS_CPU = {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu", "Softmax",
                "HardSwish", "HardSigmoid"}
SHARE_SCALE_CPU = {"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split"}
# Other targets (TensorRT, CUDA): the op sets of before the measurement, not gated by .kernels.
INT8_OPS = {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"}
SHARE_SCALE = {"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}
FOLDABLE = {"Relu", "Clip"}
# Div/Mul by a positive scalar constant right after a quantized tensor: the same integers with the
# scale divided/multiplied (the node disappears into the DequantizeLinear's scale).
RESCALE = {"Div", "Mul"}
LEFT_FLOAT_REASONS = {
    "LayerNormalization": "LayerNormalization stays float (needs float statistics)",
    "Gelu": "Gelu stays float (no fused int8 kernel)",
}
LEFT_FLOAT_REASONS_OTHER = {
    "Softmax": "Softmax stays float (no fused int8 kernel worth its accuracy cost)",
    "HardSwish": "HardSwish stays float (no int8 kernel on this target)",
    "HardSigmoid": "HardSigmoid stays float (no int8 kernel on this target)",
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
    role: str  # weighted | int8 | share | fold | rescale | dynamic (LSTM, see .recurrent) | float
    weight_input: int | None = None
    weight_axis: int | None = None
    bias_input: int | None = None
    reason: str = ""
    factor: float | None = None  # rescale: y = x * factor
    data_input: int = 0  # rescale: which input is the tensor (the other is the constant)
    hard_sigmoid: tuple[float, float] | None = None  # HardSigmoid/HardSwish (alpha, beta), expanded in int8


@dataclasses.dataclass
class Analysis:
    infos: list[NodeInfo]
    skipped: list[tuple[str, str, str]]  # (name, op_type, reason) for nodes never candidates


def _is_float(v: ir.Value | None) -> bool:
    return v is not None and (v.dtype is None or v.dtype == ir.DataType.FLOAT)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _rescale_factor(node: ir.Node) -> tuple[float, int] | None:
    """``(f, data input)`` if ``node`` is ``x / c`` or ``x * c`` with a positive finite scalar constant
    (``y = f x``)."""
    if node.op_type not in RESCALE or len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    a, b = (const_value(v) for v in node.inputs)
    if node.op_type == "Div" and (a is not None or b is None):
        return None
    c = b if b is not None else a
    if c is None or (a is not None and b is not None) or c.size != 1 or c.dtype != np.float32:
        return None
    data = node.inputs[0] if b is not None else node.inputs[1]
    c = float(np.asarray(c).reshape(()))
    if not _is_float(data) or not np.isfinite(c) or c <= 0:
        return None
    # broadcasting a (1, 1, ...) constant may add dimensions; only a true scalar keeps the shape
    if node.inputs[1 if b is not None else 0].shape is not None and len(node.inputs[1 if b is not None else 0].shape) > (
            len(data.shape) if data.shape is not None else 0):
        return None
    return (1.0 / c if node.op_type == "Div" else c), (0 if b is not None else 1)


def analyze(model: ir.Model, *, per_channel: bool, exclude: Sequence[str], include_ops: Sequence[str] | None,
            target: str, path: str = "amx") -> Analysis:
    """Classify every main-graph node (see the module docstring); ``path`` is the CPU's int8 path."""
    from onnxforge.passes.quantize.kernels import pays

    graph = model.graph
    infos: list[NodeInfo] = []
    skipped = []
    excl = set(exclude or ())
    cpu = target == "cpu"
    int8_ops = INT8_OPS_CPU if cpu else INT8_OPS
    share_ops = SHARE_SCALE_CPU if cpu else SHARE_SCALE
    left_float = LEFT_FLOAT_REASONS if cpu else {**LEFT_FLOAT_REASONS, **LEFT_FLOAT_REASONS_OTHER}
    for i, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{i}"
        info = NodeInfo(i, name, node.op_type, "float")
        infos.append(info)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op in left_float:
            info.reason = left_float[op]
            continue
        rescale = _rescale_factor(node) if cpu else None
        if rescale is not None and name not in excl and op not in excl:
            info.role = "rescale"
            info.factor, info.data_input = rescale
            continue
        if op not in WEIGHTED | int8_ops | share_ops | FOLDABLE | (RECURRENT if cpu else set()):
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
        elif op in RECURRENT and cpu:
            why = lstm_not_quantizable(node)
            if why:
                info.reason = why
                continue
            # int8 weights, activations quantized by the kernel at run time: no Q/DQ, not in a region
            info.role = "dynamic"
            info.weight_input = 1
        elif op in FOLDABLE:
            if op == "Clip":
                lo = const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
                if lo is None or float(np.asarray(lo)) != 0.0:
                    info.reason = "Clip with min != 0 cannot be folded into a Q range"
                    continue
            info.role = "fold"
        elif op in int8_ops:
            if not all(_is_float(v) for v in node.inputs if v is not None):
                info.reason = "non-float inputs"
                continue
            if cpu and not _pays(op, path, info, pays):
                continue
            if op in ("HardSwish", "HardSigmoid"):
                alpha = 1.0 / 6.0 if op == "HardSwish" else float(_attr(node, "alpha", 0.2))
                beta = 0.5 if op == "HardSwish" else float(_attr(node, "beta", 0.5))
                if alpha <= 0 or beta <= 0:
                    info.reason = f"{op} with alpha <= 0 or beta <= 0 has no int8 expansion"
                    continue
                info.hard_sigmoid = (alpha, beta)
            info.role = "int8"
        elif op in share_ops:
            if not _is_float(node.inputs[0]):
                info.reason = "non-float input"
                continue
            if cpu and not _pays(op, path, info, pays):
                continue
            info.role = "share"
    for info in infos:
        if info.role == "float" and info.reason:
            skipped.append((info.name, info.op_type, info.reason))
    return Analysis(infos, skipped)


def _pays(op: str, path: str, info: NodeInfo, pays) -> bool:
    ok, why = pays(op, path)
    if not ok:
        info.reason = why
    return ok


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
    # "dynamic" nodes (LSTM -> DynamicQuantizeLSTM) are quantized on their own: no Q/DQ at their
    # edges, so they pull no neighbour into an int8 region (added after the regions grew)
    dynamic = {i.index for i in infos if i.role == "dynamic" and i.index not in forced_float}
    if target == "tensorrt":
        # TensorRT: Q/DQ on the inputs of the ops it runs in int8; residual Adds next to them.
        for info in infos:
            if info.role == "int8" and info.op_type == "Add" and info.index not in forced_float:
                if _touches(nodes[info.index], chosen, pos):
                    chosen.add(info.index)
        return chosen
    candidates = {i.index for i in infos if i.role in ("int8", "share", "rescale") and i.index not in forced_float}
    changed = True
    while changed:
        changed = False
        for idx in sorted(candidates - chosen):
            node = nodes[idx]
            info = infos[idx]
            if info.role in ("share", "rescale"):
                # share: only inside an int8 region (quantized producer and consumer on the data path);
                # rescale: behind a quantized producer (it becomes a DequantizeLinear's scale, free)
                data = node.inputs[info.data_input]
                src = data.producer() if data is not None else None
                src_q = src is not None and _index(src, pos) in chosen | _folded_into(src, chosen, pos, infos)
                # (a rescale or scale-sharing reader counts: chains like Slice -> Slice -> Mul(0.5) join
                # from their quantized end; a region that ends in float pays its DQ there either way)
                dst_q = info.role == "rescale" or any(
                    _index(c, pos) in chosen or (_role(infos, _index(c, pos)) in ("rescale", "share")
                                                 and _index(c, pos) not in forced_float)
                    for o in node.outputs for c in o.consumers())
                if src_q and dst_q:
                    chosen.add(idx)
                    changed = True
            elif _touches(node, chosen, pos, infos):
                chosen.add(idx)
                changed = True
    return chosen | dynamic


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



def regions(model: ir.Model, analysis: Analysis, chosen: set[int]) -> list[list[int]]:
    """The connected int8 regions of ``chosen``: node indices grouped by shared quantized tensors.

    Two chosen nodes are in one region when one reads the other's output, directly or through a
    folded activation (Relu/Clip). Regions are ordered by their first node; each is sorted.
    """
    nodes = list(model.graph)
    pos = _Positions(nodes)
    infos = analysis.infos
    parent = {i: i for i in chosen}
    dynamic = {i for i in chosen if infos[i].role == "dynamic"}  # each its own region

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in sorted(chosen):
        for v in nodes[i].inputs:
            p = v.producer() if v is not None else None
            if p is None:
                continue
            pi = _index(p, pos)
            if _role(infos, pi) == "fold":  # look through the folded activation to its producer
                src = p.inputs[0].producer() if p.inputs[0] is not None else None
                pi = _index(src, pos) if src is not None else -1
            if pi in parent and i not in dynamic and pi not in dynamic:
                parent[find(i)] = find(pi)
    groups: dict[int, list[int]] = {}
    for i in sorted(chosen):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])
