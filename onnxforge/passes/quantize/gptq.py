"""GPTQ weight rounding for ``quantize-int8`` (option ``weight_rounding="gptq"``).

Round-to-nearest rounds every weight on its own. What the network sees is the layer's *output*
``W X`` on real inputs, so the rounding of one weight can compensate the error of others reading
correlated inputs. Per layer (and per conv group), with ``X`` the layer's float input as columns
(im2col patches of a Conv, rows of a Gemm/MatMul input) over the calibration data, GPTQ (Frantar
et al., 2023; the Optimal Brain Quantizer of Frantar & Alistarh, 2022) minimises

    || W X - s * Q X ||_F^2 = tr(E H E^T),   E = W - s * Q,   H = X X^T / m

over integer ``Q`` in ``[-qmax, qmax]`` with the per-output-channel scale ``s`` fixed (the same
``max|w| / qmax`` as round-to-nearest, so int8 kernels and biases see nothing new). Greedy over
input columns in order of decreasing ``H_ii`` ("act order"): round column ``i`` to nearest, then
spread its error over the not-yet-rounded columns, ``W[:, j] -= e_i * U[i, j] / U[i, i]`` with
``U`` the upper Cholesky factor of ``(H + lambda I)^-1`` (``lambda`` = 1 % of the mean diagonal).

Lossy like any int8 weight; never worse than round-to-nearest on the objective above: each layer
keeps the rounding (GPTQ or nearest) with the smaller ``tr(E H E^T)`` on the calibration columns
(counted). Layers it cannot fit (auto_pad, non-2-D convs, batched MatMul weights, shared weights)
keep round-to-nearest, each with its reason. ``H`` is accumulated from at most ``_COLUMNS`` random
output positions per sample (seeded: the same data gives the same model).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from onnxforge.ir.graph import const_value
from onnxforge.passes.base import PassStats
from onnxforge.passes.quantize.analysis import _attr
from onnxforge.passes.quantize.qmath import (
    WEIGHT_QMAX,
    WEIGHT_QMAX_REDUCED,
    activation_qparams,
    u8s8_saturation_risk,
    weight_qparams,
    weight_scale_floor,
)

logger = logging.getLogger(__name__)

_COLUMNS = 2048  # output positions per sample that enter H (random subset of a conv's H_out x W_out)
_DAMP = 0.01


@dataclasses.dataclass
class _Layer:
    """One weighted node: its float weight as rows (output channels) x columns, per group."""

    index: int
    name: str
    op: str
    x: str  # name of the float input tensor
    weight: str  # initializer name
    w: np.ndarray  # original float weight, original layout
    axis: int | None
    group: int = 1
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    transposed: bool = False  # Gemm without transB / MatMul: weight is (K, N)
    h: np.ndarray | None = None  # (G, K, K) sum of X X^T
    m: int = 0  # columns accumulated

    def rows(self) -> np.ndarray:
        """The weight as (G, rows of the group, K) float64."""
        w = np.asarray(self.w, np.float64)
        if self.op == "Conv":
            cout = w.shape[0]
            return w.reshape(self.group, cout // self.group, -1)
        return (w.T if self.transposed else w)[None]

    def from_rows(self, r: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return r.reshape(self.w.shape)
        return r[0].T if self.transposed else r[0]

    def columns(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The input as (G, K, m) columns: im2col patches (Conv) or input rows (Gemm/MatMul)."""
        if self.op != "Conv":
            k = x.shape[-1]
            cols = np.asarray(x, np.float32).reshape(-1, k)
            if cols.shape[0] > _COLUMNS:
                cols = cols[np.sort(rng.choice(cols.shape[0], _COLUMNS, replace=False))]
            return cols.T[None]
        n, c, hh, ww = x.shape
        kh, kw = self.kernel
        dh, dw = self.dilations
        sh, sw = self.strides
        pt, pl, pb, pr = self.pads
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
        ho, wo = win.shape[2], win.shape[3]
        pos = np.arange(ho * wo)
        if pos.size > _COLUMNS:
            pos = np.sort(rng.choice(pos.size, _COLUMNS, replace=False))
        p = win[:, :, pos // wo, pos % wo]  # (N, C, m, kh, kw)
        g = self.group
        p = p.reshape(n, g, c // g, pos.size, kh, kw).transpose(1, 2, 4, 5, 0, 3)
        return np.ascontiguousarray(p, np.float32).reshape(g, (c // g) * kh * kw, n * pos.size)

    def update(self, x: np.ndarray, rng: np.random.Generator) -> None:
        cols = self.columns(x, rng).astype(np.float32)  # float32 products, float64 sums across samples
        h = (cols @ cols.transpose(0, 2, 1)).astype(np.float64)
        self.h = h if self.h is None else self.h + h
        self.m += cols.shape[2]


def _layer(node, info, index: int) -> tuple[_Layer | None, str]:
    """The :class:`_Layer` of a weighted node, or None and why GPTQ leaves it to round-to-nearest."""
    wv = node.inputs[info.weight_input]
    w = const_value(wv)
    if w is None:
        return None, "weight is not a constant"
    if any(u.node is not node for u in wv.uses()):
        return None, "weight shared with another node"
    base = dict(index=index, name=node.name, op=node.op_type, x=node.inputs[0].name, weight=wv.name,
                w=np.asarray(w, np.float32), axis=info.weight_axis)
    if node.op_type == "Conv":
        if w.ndim != 4:
            return None, f"{w.ndim - 2}-D convolution (GPTQ here fits 2-D convs)"
        if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return None, "auto_pad (explicit pads needed for im2col)"
        g = int(_attr(node, "group", 1))
        if info.weight_axis != 0:
            return None, "per-tensor weight"
        pads = tuple(int(p) for p in _attr(node, "pads", [0, 0, 0, 0]))
        return _Layer(**base, group=g, kernel=tuple(w.shape[2:]),
                      strides=tuple(int(s) for s in _attr(node, "strides", [1, 1])),
                      pads=(pads[0], pads[1], pads[2], pads[3]),
                      dilations=tuple(int(d) for d in _attr(node, "dilations", [1, 1]))), ""
    if w.ndim != 2:
        return None, f"{w.ndim}-D {node.op_type} weight"
    if node.op_type == "Gemm":
        if int(_attr(node, "transA", 0)):
            return None, "Gemm with transA"
        trans_b = bool(int(_attr(node, "transB", 0)))
        if info.weight_axis != (0 if trans_b else 1):
            return None, "per-tensor weight"
        return _Layer(**base, transposed=not trans_b), ""
    if node.op_type == "MatMul" and info.weight_input == 1 and info.weight_axis in (1, -1):
        return _Layer(**base, transposed=True), ""
    return None, f"{node.op_type} layout not handled"


def gptq_round(w: np.ndarray, s: np.ndarray, h: np.ndarray, qmax: int, damp: float = _DAMP) -> np.ndarray:
    """Integer weights minimising ``tr(E H E^T)`` greedily (GPTQ with act order), batched over groups.

    ``w`` (G, R, K) float, ``s`` (G, R) scales, ``h`` (G, K, K). Returns (G, R, K) integers in
    ``[-qmax, qmax]``. A group whose damped ``H`` is not positive definite is rounded to nearest."""
    w = np.array(w, np.float64)
    s = np.asarray(s, np.float64)[..., None]
    g, r, k = w.shape
    h = np.array(h, np.float64)
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    for gi in range(g):  # inputs that never fire: no constraint, round to nearest
        d = np.flatnonzero(dead[gi])
        h[gi, d, d] = 1.0
    perm = np.argsort(-np.einsum("gii->gi", h), axis=1, kind="stable")
    wp = np.take_along_axis(w, perm[:, None, :], axis=2)
    hp = np.take_along_axis(np.take_along_axis(h, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    mean_diag = np.einsum("gii->gi", hp).mean(axis=1)
    hp = hp + (damp * mean_diag)[:, None, None] * np.eye(k)[None]
    q = np.empty_like(wp)
    ok = np.ones(g, bool)
    try:  # upper U with H^-1 = U^T U, all groups at once
        u = np.linalg.cholesky(np.linalg.inv(hp)).transpose(0, 2, 1)
    except np.linalg.LinAlgError:
        u = np.zeros_like(hp)
        for gi in range(g):
            try:
                u[gi] = np.linalg.cholesky(np.linalg.inv(hp[gi])).T
            except np.linalg.LinAlgError:
                ok[gi] = False
                u[gi] = np.eye(k)
    for i in range(k):
        col = wp[:, :, i]
        qi = np.clip(np.rint(col / s[:, :, 0]), -qmax, qmax)
        q[:, :, i] = qi
        err = (col - qi * s[:, :, 0]) / u[:, i, i][:, None]
        if i + 1 < k:
            wp[:, :, i + 1:] -= err[:, :, None] * u[:, None, i, i + 1:]
    out = np.empty_like(q)
    np.put_along_axis(out, perm[:, None, :], q, axis=2)
    if not ok.all():
        out[~ok] = np.clip(np.rint(w[~ok] / s[~ok]), -qmax, qmax)
    return out


def objective(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """``sum_g tr(E_g H_g E_g^T)`` with ``E = w - wq`` (both (G, R, K)): the layer's output error."""
    e = np.asarray(w, np.float64) - np.asarray(wq, np.float64)
    return float(np.sum((e @ h) * e))


class _Dispatch:
    """collect_stats reducer: every layer reading the tensor accumulates its own H."""

    def __init__(self, layers: dict[str, list[_Layer]], rng: np.random.Generator) -> None:
        self.layers, self.rng = layers, rng

    def update(self, name: str, x: np.ndarray) -> None:
        for layer in self.layers.get(name, ()):
            layer.update(np.asarray(x, np.float32), self.rng)


def gptq_rounding(qc, chosen: set[int], stats: PassStats, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{weight initializer: (float weight on the int8 grid, per-channel scale)}`` for the chosen
    weighted nodes where GPTQ lowers the output error (others keep round-to-nearest)."""
    from onnxforge.runtime.activations import collect_stats

    infos = qc.analysis.infos
    model = qc.fresh()
    nodes = list(model.graph)
    layers: list[_Layer] = []
    for i in sorted(chosen):
        info = infos[i]
        if info.role != "weighted":
            continue
        layer, why = _layer(nodes[i], info, i)
        if layer is None:
            stats.skip(nodes[i], f"weight_rounding=gptq: round-to-nearest kept ({why})")
            stats.count("gptq_not_applicable")
            continue
        layers.append(layer)
    if not layers:
        return {}
    by_x: dict[str, list[_Layer]] = {}
    for layer in layers:
        by_x.setdefault(layer.x, []).append(layer)

    rng = np.random.default_rng(seed)  # one stream, consumed in sample order: deterministic
    collect_stats(qc.float_bytes, qc.feeds, sorted(by_x), lambda: _Dispatch(by_x, rng))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    gains = []
    for layer in layers:
        node = nodes[layer.index]
        if layer.h is None or layer.m == 0:
            stats.skip(node, "weight_rounding=gptq: its input was not seen on the calibration data")
            continue
        qmax = WEIGHT_QMAX
        x_qp = None
        if layer.x in qc.ranges:
            lo, hi = qc.ranges[layer.x]
            x_qp = activation_qparams(lo, hi, qc.act_dtype, qc.symmetric)
            if qc.reduce_range and u8s8_saturation_risk(x_qp.zero_point):
                qmax = WEIGHT_QMAX_REDUCED  # as .rewrite will (7-bit weights behind a high zero point)
        info = infos[layer.index]
        floor = None
        if info.bias_input is not None and x_qp is not None and qc.target != "tensorrt":
            b = const_value(node.inputs[info.bias_input])
            if b is not None:
                floor = weight_scale_floor(b + qc.bias_delta.get(node.inputs[info.bias_input].name, 0.0),
                                           x_qp.scale, per_channel=True)
        scale = weight_qparams(layer.w, layer.axis, floor, qmax=qmax).scale  # (R_total,)
        rows = layer.rows()
        s = scale.astype(np.float64).reshape(rows.shape[0], rows.shape[1])
        h = layer.h / layer.m
        q = gptq_round(rows, s, h, qmax)
        rtn = np.clip(np.rint(rows / s[..., None]), -qmax, qmax)
        e_gptq = objective(rows, q * s[..., None], h)
        e_rtn = objective(rows, rtn * s[..., None], h)
        if not e_gptq < e_rtn:
            stats.count("gptq_kept_nearest")
            continue
        gains.append(e_gptq / e_rtn if e_rtn > 0 else 1.0)
        wq = layer.from_rows(q * s[..., None]).astype(np.float32)
        out[layer.weight] = (wq, scale.astype(np.float32))
    stats.count("gptq_layers", len(out))
    if gains:
        stats.details["gptq"] = {"layers": len(out), "median_error_ratio_vs_nearest": round(float(np.median(gains)), 4),
                                 "objective": "||W X - W_q X||^2 on calibration im2col columns"}
        stats.note(f"weight_rounding=gptq: {len(out)} layer(s); output error vs round-to-nearest: median "
                   f"{np.median(gains):.3f}x")
    return out
