"""QuantizeLinear / DequantizeLinear in the torch graph runner: quantization-aware distillation.

A QDQ model (what ``quantize-int8`` writes) is a float graph with a rounding step at every
``QuantizeLinear``. To fine-tune such a model end to end, the runner simulates the rounding in float
and lets the gradient through it with the straight-through estimator (Bengio et al. 2013, as in
quantization-aware training, Jacob et al. 2018)::

    Q(x)  = clamp(round(x / s) + z, q_min, q_max)     forward: exactly onnxruntime's QuantizeLinear
                                                       (round half to even), held in a float tensor
    dQ/dx = 1 / s  inside [q_min, q_max], 0 where clamped   backward: rounding is taken as identity
    DQ(q) = (q - z) * s

Activation scales and zero points stay as calibrated (they are constants of the graph). The
*weights* are trained in float: every ``DequantizeLinear`` that reads a constant integer tensor
(int8 weights, int32 biases) becomes a float parameter ``w`` initialised to ``DQ(q)``, and the node
computes ``DQ(Q(w))`` with the same scale and zero point, so the forward pass sees exactly the int8
grid and the parameter accumulates the small updates that decide which grid point each weight
rounds to. :func:`quantized_values` rounds the trained parameter back onto that grid for
``write_back``: the graph, the scales and every name stay as they are, only the integers change.

Per-axis scales (``axis``) are supported; blocked quantization (``block_size``) and float8 are not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.errors import UnsupportedModelError

__all__ = ["INTEGER_RANGES", "dequantize", "quantize", "quantized_values"]

INTEGER_RANGES: dict[ir.DataType, tuple[int, int]] = {
    ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127),
    ir.DataType.UINT16: (0, 65535), ir.DataType.INT16: (-32768, 32767),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
    ir.DataType.UINT4: (0, 15), ir.DataType.INT4: (-8, 7),
}


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _check_supported(node: ir.Node) -> None:
    if int(_attr(node, "block_size", 0) or 0):
        raise UnsupportedModelError(f"distill: {node.op_type} {node.name!r} with block_size (blocked quantization)")


def quantized_type(node: ir.Node) -> ir.DataType:
    """The integer type of a QuantizeLinear's output / a DequantizeLinear's input."""
    if node.op_type == "DequantizeLinear" and node.inputs[0] is not None and node.inputs[0].dtype is not None:
        dtype = node.inputs[0].dtype
    elif len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].dtype is not None:
        dtype = node.inputs[2].dtype
    elif _attr(node, "output_dtype"):
        dtype = ir.DataType(int(_attr(node, "output_dtype")))
    else:
        dtype = ir.DataType.UINT8  # the operator's default
    if dtype not in INTEGER_RANGES:
        raise UnsupportedModelError(f"distill: {node.op_type} {node.name!r} with {dtype} (integer types only)")
    return dtype


def _broadcast(t, rank: int, axis: int):
    """A per-axis scale/zero point ``[C]`` reshaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if t.dim() == 0 or rank == 0:
        return t
    axis = axis + rank if axis < 0 else axis
    shape = [1] * rank
    shape[axis] = t.numel()
    return t.reshape(shape)


def _params(node: ir.Node, a: list, x, torch):
    scale = a[1]
    zp = a[2] if len(a) > 2 and a[2] is not None else torch.zeros((), dtype=torch.float32)
    axis = int(_attr(node, "axis", 1))
    return (_broadcast(scale.to(torch.float32), x.dim(), axis),
            _broadcast(zp.to(torch.float32), x.dim(), axis))


def _to_grid(x, scale, zp, dtype: ir.DataType, torch):
    """``clamp(round(x / scale) + zp)`` in float: round forward, identity backward inside the range."""
    lo, hi = INTEGER_RANGES[dtype]
    v = x / scale
    v = v + (torch.round(v) - v).detach()
    return torch.clamp(v + zp, float(lo), float(hi))


def quantize(node: ir.Node, a: list, torch, F):
    """QuantizeLinear, simulated in float with a straight-through gradient (see the module docstring)."""
    _check_supported(node)
    x = a[0].to(torch.float32)
    scale, zp = _params(node, a, x, torch)
    return _to_grid(x, scale, zp, quantized_type(node), torch)


def dequantize(node: ir.Node, a: list, torch, F):
    """DequantizeLinear on a float tensor holding integers."""
    _check_supported(node)
    q = a[0].to(torch.float32)
    scale, zp = _params(node, a, q, torch)
    return (q - zp) * scale


def fake_quantize(node: ir.Node, w, scale, zp, torch):
    """``DQ(Q(w))`` for a trained float weight ``w`` read through ``node`` (a DequantizeLinear)."""
    s, z = _params(node, [w, scale, zp], w, torch)
    return (_to_grid(w, s, z, quantized_type(node), torch) - z) * s


def quantized_values(node: ir.Node, w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None,
                     dtype: np.dtype) -> np.ndarray:
    """``Q(w)`` as the integer initializer ``node`` reads: the trained float weight back on its grid."""
    axis = int(_attr(node, "axis", 1))
    rank = w.ndim
    axis = axis + rank if axis < 0 else axis

    def bc(t):
        t = np.asarray(t, np.float64)
        if t.ndim == 0 or rank == 0:
            return t
        shape = [1] * rank
        shape[axis] = t.size
        return t.reshape(shape)

    lo, hi = INTEGER_RANGES[quantized_type(node)]
    z = bc(zp) if zp is not None else 0.0
    q = np.clip(np.rint(np.asarray(w, np.float64) / bc(scale)) + z, lo, hi)
    return q.astype(dtype)
