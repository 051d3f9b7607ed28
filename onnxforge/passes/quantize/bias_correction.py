"""Bias correction for ``quantize-int8`` (option ``bias_correction``): the mean error of int8 weights.

Rounding a weight tensor to int8 changes each output channel's *mean*: with ``eps = W - Q(W)``
(the weight rounding error, known exactly once the weights are quantized),

    E[(W x)_c] - E[(Q(W) x)_c] = sum_k (sum over the kernel window of eps[c, k]) * E[x_k]

for a Conv (``k`` the input channels of ``c``'s group; Gemm: ``eps @ E[x]``). For layers with few
weights per output (depthwise 3x3: 9) this shift is not small, and it adds up through the network
(MobileNets and EfficientNets are the known victims). As in Nagel et al. (Data-Free Quantization,
2019), the shift is added to the layer's bias, ``b_c <- b_c + delta_c``, with ``E[x_k]`` the
per-channel mean of the layer's *float* input on the calibration data (one float run).

What it leaves: the rounding of activations (zero-mean), saturation at the calibrated range, and
zero padding at the borders (the window sum is taken over the whole kernel). An earlier variant that
measured the int8 model's output means and corrected all layers at once over-corrected deep layers
(each layer's correction was measured before its inputs were corrected): this one needs no int8 run
and each correction is local. Nodes without a constant bias, or sharing it with another node, are
left alone (counted).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from onnxforge.ir.graph import const_value
from onnxforge.passes.base import PassStats

logger = logging.getLogger(__name__)


class _ChannelMean:
    """Streaming per-channel mean of one tensor (channel axis 1 for rank >= 3, else the last)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.n = 0

    def update(self, name: str, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        axis = 1 if x.ndim >= 3 else x.ndim - 1
        other = tuple(i for i in range(x.ndim) if i != axis)
        s = x.sum(axis=other)
        cnt = x.size // max(1, x.shape[axis])
        self.total = s if self.total is None else self.total + s
        self.n += cnt

    def mean(self) -> np.ndarray | None:
        return None if self.total is None or self.n == 0 else self.total / self.n


def _means(model: Any, feeds: list, names: list[str]) -> dict[str, np.ndarray]:
    from onnxforge.runtime.activations import collect_stats

    stats = collect_stats(model, feeds, names, _ChannelMean)
    out = {}
    for name, red in stats.items():
        m = red.mean()
        if m is not None:
            out[name] = m
    return out


def _dequantized_weight(v) -> np.ndarray | None:
    """The float value a DequantizeLinear of a constant int8 weight produces (None otherwise)."""
    from onnxforge.passes.quantize.qmath import QParams, dequantize

    p = v.producer() if v is not None else None
    if p is None or p.op_type != "DequantizeLinear":
        return None
    q, s = const_value(p.inputs[0]), const_value(p.inputs[1])
    z = const_value(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else np.zeros_like(s, np.int8)
    if q is None or s is None or z is None:
        return None
    a = p.attributes.get("axis")
    axis = (a.value if a is not None else 1) if np.asarray(s).ndim == 1 else None
    return dequantize(q, QParams(np.asarray(s), np.asarray(z), axis))


def _shift(op: str, node, eps: np.ndarray, mean_x: np.ndarray) -> np.ndarray | None:
    """``E[(W - Q(W)) x]`` per output channel from the weight error and the input's channel means."""
    if op == "Conv" and eps.ndim >= 3:
        a = node.attributes.get("group")
        g = int(a.value) if a is not None else 1
        cout, cin_g = eps.shape[0], eps.shape[1]
        if mean_x.shape != (cin_g * g,) or cout % g:
            return None
        e = eps.reshape(cout, cin_g, -1).sum(axis=2)  # window sum
        mx = mean_x.reshape(g, cin_g)[np.arange(cout) // (cout // g)]  # each output's group inputs
        return (e * mx).sum(axis=1)
    if op == "Gemm" and eps.ndim == 2:
        a = node.attributes.get("transB")
        e = eps if (a is not None and a.value) else eps.T  # (N, K)
        return e @ mean_x if mean_x.shape == (e.shape[1],) else None
    return None


def bias_correction(qc, chosen: set[int], stats: PassStats) -> dict[str, np.ndarray]:
    """Per-bias float deltas (initializer name -> array) for the chosen Conv/Gemm nodes with a bias."""
    infos = qc.analysis.infos
    model = qc.fresh()
    nodes = list(model.graph)
    targets: dict[int, tuple[str, str]] = {}  # node index -> (input tensor, bias initializer)
    for i in sorted(chosen):
        info = infos[i]
        if info.role != "weighted" or info.op_type not in ("Conv", "Gemm"):
            continue
        node = nodes[i]
        bias = node.inputs[info.bias_input] if info.bias_input is not None else None
        if bias is None or not bias.name or bias.name not in model.graph.initializers:
            stats.count("bias_correction_no_bias")
            continue
        if any(u.node is not node for u in bias.uses()):
            stats.count("bias_correction_shared_bias")  # one bias, several layers: not ours to shift
            continue
        targets[i] = (node.inputs[0].name, bias.name)
    if not targets:
        return {}
    means = _means(qc.float_bytes, qc.feeds, sorted({x for x, _ in targets.values()}))
    built = qc.build(chosen, bias_delta={})
    by_name = {n.name: n for n in built.graph if n.name}
    deltas: dict[str, np.ndarray] = {}
    rel = []
    for i, (x, bname) in targets.items():
        node = nodes[i]
        qnode = by_name.get(node.name)
        w = const_value(node.inputs[infos[i].weight_input])
        wq = _dequantized_weight(qnode.inputs[infos[i].weight_input]) if qnode is not None else None
        if x not in means or w is None or wq is None or wq.shape != w.shape:
            stats.count("bias_correction_skipped")
            continue
        d = _shift(node.op_type, node, (w - wq).astype(np.float64), means[x])
        b = const_value(node.inputs[infos[i].bias_input])
        if d is None or b is None or d.shape != b.shape:
            stats.count("bias_correction_skipped")
            continue
        deltas[bname] = d.astype(np.float32)
        rel.append(float(np.max(np.abs(d)) / (np.max(np.abs(b)) + 1e-12)))
    stats.count("biases_corrected", len(deltas))
    stats.details["bias_correction"] = {"layers": len(deltas), "method": "E[(W - Q(W)) x] from float input means",
                                        "max_shift_over_max_bias": round(max(rel), 5) if rel else 0.0}
    return deltas
