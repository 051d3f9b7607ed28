"""Quantization arithmetic shared by the quantization passes.

Linear (affine) quantization, as ONNX ``QuantizeLinear`` / ``DequantizeLinear`` define it::

    q = saturate(round_half_to_even(x / scale) + zero_point)       # QuantizeLinear
    x' = (q - zero_point) * scale                                   # DequantizeLinear

``saturate`` clips to the integer type's range ([0, 255] for uint8, [-128, 127] for int8). The
error of one element inside the calibrated range is at most ``scale / 2``; outside it the value
saturates to the range's edge.

Parameters from a real range ``[lo, hi]`` (always widened to contain 0, so that 0 is exact and
zero-padding is lossless):

* asymmetric (uint8 activations, or int8 with a zero point): ``scale = (hi - lo) / (qmax - qmin)``,
  ``zero_point = clip(round(qmin - lo / scale), qmin, qmax)``;
* symmetric (weights; every tensor for TensorRT): ``scale = max(|lo|, |hi|) / 127``,
  ``zero_point = 0``; weights use the restricted range [-127, 127] so that ``-w`` is representable.

Bias of Conv/Gemm/MatMul is quantized to int32 with ``scale_b = scale_x * scale_w`` (per output
channel) and ``zero_point = 0``, which is what integer kernels accumulate into. When a channel's
weights are tiny next to its bias (a layer re-fitted so that the bias carries the output), that
product is so small that ``b / scale_b`` leaves the int32 range and saturation would silently
replace the bias by ~0; the weight scale is then raised to the floor
``|b| / (scale_x * BIAS_QMAX)`` (:func:`weight_scale_floor`), as TFLite and onnxruntime's quantizer
do: the weights lose only precision they did not contribute anyway, the bias stays exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

INT8_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
WEIGHT_QMAX = 127  # symmetric weights use [-127, 127]
WEIGHT_QMAX_REDUCED = 63  # 7-bit weights where u8s8 int16 accumulation could saturate, see below
# Largest |int32 bias| we write: 2**30 leaves the accumulator (bias + sum of int8 products) headroom.
BIAS_QMAX = float(2**30)


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point of one tensor (scalars, or 1-D along ``axis`` for per-channel)."""

    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # uint8/int8/int32, same shape as scale
    axis: int | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    def same_as(self, other: QParams) -> bool:
        return (
            self.axis == other.axis
            and self.zero_point.dtype == other.zero_point.dtype
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
        )


def activation_qparams(lo: float, hi: float, dtype: np.dtype, symmetric: bool) -> QParams:
    """QParams for an activation calibrated to ``[lo, hi]`` (see the module docstring)."""
    dtype = np.dtype(dtype)
    qmin, qmax = INT8_RANGE[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        absmax = max(-lo, hi)
        scale = absmax / 127.0 if absmax > 0 else 1.0
        zp = 0 if dtype == np.int8 else 128
    else:
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
        zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    return QParams(np.asarray(scale, np.float32), np.asarray(zp, dtype))


def u8s8_saturation_risk(x_zero_point: np.ndarray | None) -> bool:
    """Whether a uint8 input with this zero point needs 7-bit weights on onnxruntime's CPU kernels.

    On x86 without VNNI (AVX2, AVX-512 without VNNI), onnxruntime's u8 x s8 GEMM (QLinearConv,
    QLinearMatMul, MatMulInteger) multiplies raw uint8 activations by int8 weights with
    ``vpmaddubsw``, which adds *pairs* of products in int16 and saturates: ``a0 w0 + a1 w1`` with
    ``a`` up to 255 and ``|w|`` up to 127 reaches 64770 > 32767. The zero point is subtracted
    later, so what counts is the raw ``a``: an input whose zero point is 128 (a range around 0,
    e.g. images normalized to [-1, 1]) sits at ``a = 128`` for every zero and saturates all the
    time, not by chance. With weights in [-63, 63] no pair can saturate (255 * 63 * 2 = 32130).
    Measured on the digits CNN pruned 0.5 + ``reconstruct``: 0.9278 accuracy with 8-bit weights
    after its [-1, 1] input, 0.9833 (= fp32) with 7-bit weights there; the same QDQ model run
    without the int8 fusion (``ORT_DISABLE_ALL``) gives 0.9833 either way.

    True when the zero point is at least 64 (zeros alone use half the int16 headroom); a
    post-ReLU input (zero point 0) is left at 8 bits.
    """
    if x_zero_point is None:
        return False
    zp = np.asarray(x_zero_point)
    return zp.dtype == np.uint8 and zp.size > 0 and int(zp.max()) >= 64


def weight_qparams(w: np.ndarray, axis: int | None, min_scale: np.ndarray | None = None,
                   qmax: int = WEIGHT_QMAX) -> QParams:
    """Symmetric int8 QParams of a weight in ``[-qmax, qmax]``, per channel along ``axis`` or per
    tensor (axis None).

    ``min_scale`` (scalar or per channel) is a floor on the scale, see :func:`weight_scale_floor`."""
    w = np.asarray(w, np.float32)
    if axis is None:
        absmax = np.asarray(np.max(np.abs(w)) if w.size else 0.0)
    else:
        axis = axis % w.ndim
        other = tuple(i for i in range(w.ndim) if i != axis)
        absmax = np.max(np.abs(w), axis=other) if other else np.abs(w)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float64)
    if min_scale is not None:
        floor = np.asarray(min_scale, np.float64)
        if scale.ndim == 0 and floor.ndim:
            floor = floor.max(initial=0.0)
        scale = np.maximum(scale, floor)
    scale = scale.astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int8), axis)


def weight_scale_floor(bias: np.ndarray, x_scale: np.ndarray | float, per_channel: bool) -> np.ndarray:
    """Smallest weight scale that keeps ``bias / (x_scale * w_scale)`` within ``+-BIAS_QMAX``
    (per output channel, or one scalar for a per-tensor weight)."""
    b = np.abs(np.asarray(bias, np.float64)).reshape(-1)
    xs = float(np.asarray(x_scale, np.float64).reshape(-1).max(initial=0.0))
    if xs <= 0:
        return np.zeros(b.shape if per_channel else (), np.float64)
    floor = b / (xs * BIAS_QMAX) * 1.0001  # margin against float32 rounding of the scale
    return floor if per_channel else np.asarray(floor.max(initial=0.0))


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = p.shape[0]
    return p.reshape(shape)


def quantize(x: np.ndarray, qp: QParams, qrange: tuple[int, int] | None = None) -> np.ndarray:
    """``saturate(round_half_to_even(x / scale) + zero_point)`` as ``qp.dtype``."""
    x = np.asarray(x, np.float32)
    scale = _broadcast(qp.scale, x.ndim, qp.axis)
    zp = _broadcast(qp.zero_point.astype(np.int64), x.ndim, qp.axis)
    lo, hi = qrange or INT8_RANGE.get(qp.dtype, (np.iinfo(qp.dtype).min, np.iinfo(qp.dtype).max))
    q = np.rint(x.astype(np.float64) / scale.astype(np.float64)) + zp
    return np.clip(q, lo, hi).astype(qp.dtype)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    scale = _broadcast(qp.scale, q.ndim, qp.axis)
    zp = _broadcast(qp.zero_point.astype(np.int64), q.ndim, qp.axis)
    return ((q.astype(np.int64) - zp) * scale).astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int | None, min_scale: np.ndarray | None = None,
                    qmax: int = WEIGHT_QMAX) -> tuple[np.ndarray, QParams]:
    """Symmetric int8 weight in [-qmax, qmax] (default 127) and its QParams (scale at least ``min_scale``)."""
    qp = weight_qparams(w, axis, min_scale, qmax)
    return quantize(w, qp, (-qmax, qmax)), qp


def quantize_bias(b: np.ndarray, x_scale: np.ndarray, w_qp: QParams) -> tuple[np.ndarray, QParams]:
    """int32 bias ``round_half_even(b / (x_scale * w_scale))`` (per output channel when the weight
    is per-channel), zero point 0, saturated to the int32 range."""
    scale = (np.asarray(x_scale, np.float32) * w_qp.scale).astype(np.float32)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    axis = 0 if scale.ndim == 1 else None
    qp = QParams(scale, np.zeros(scale.shape, np.int32), axis)
    info = np.iinfo(np.int32)
    q = np.clip(np.rint(b.astype(np.float64) / _broadcast(scale, b.ndim, axis).astype(np.float64)), info.min, info.max)
    return q.astype(np.int32), qp


def np_to_ir_dtype(dtype: np.dtype) -> ir.DataType:
    return ir.DataType.from_numpy(np.dtype(dtype))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays flattened (1.0 for two zero arrays)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
