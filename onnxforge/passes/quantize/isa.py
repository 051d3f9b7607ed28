"""ISA-aware int8 choices of ``quantize-int8``: activation type and weight range per CPU int8 path.

The CPU's int8 path (:func:`onnxforge.runtime.cpu.detect_isa`) decides two things:

* **weight range**: on x86 without VNNI/AMX, onnxruntime's u8 x s8 kernels add pairs of products
  in int16 (``vpmaddubsw``) and saturate when a uint8 input sits far from 0 (zero point >= 64) and
  the weights use all 8 bits; there, such layers get 7-bit weights ([-63, 63]; see
  :func:`.qmath.u8s8_saturation_risk`). With VNNI (``vpdpbusd``), AMX or ARM dot products the
  products go straight to int32: full 8-bit weights, half the weight rounding error.
* **activation type**: uint8 asymmetric (U8S8) on the CPU: VNNI/AMX multiply u8 by s8 natively;
  int8 activations would be shifted to uint8 by the kernels (no gain) and lose the asymmetric
  range's extra level on post-ReLU tensors. TensorRT wants int8 symmetric.

Per-channel weights are kept on every path: the integer kernels apply the per-channel scale in the
requantization step at no measurable cost, and per-tensor weights lose accuracy where channel
ranges differ (measured on the digits CNN and the zoo, see BENCHMARKS.md).

The choices and the reason for each go into the report (``stats.details['isa']``) and the
decision record, which replays them on any machine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from onnxforge.runtime.cpu import Isa


@dataclasses.dataclass(frozen=True)
class Int8Choices:
    path: str  # the CPU's int8 path (Isa.path), or the target for non-CPU targets
    activation_type: str  # "uint8" | "int8"
    symmetric: bool
    reduce_range: bool  # 7-bit weights where a uint8 input could saturate u8s8 int16 pair sums
    reasons: dict[str, str]

    @property
    def act_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.activation_type == "uint8" else np.int8)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def choose(isa: Isa, *, target: str = "cpu", activation_type: str = "auto",
           reduce_range: bool | None = None) -> Int8Choices:
    """The int8 choices for ``isa`` and ``target``; explicit options override the ISA's defaults."""
    reasons: dict[str, str] = {}
    if target == "tensorrt":
        reasons["activation_type"] = "TensorRT runs int8 symmetric (zero point 0)"
        reasons["reduce_range"] = "TensorRT's int8 kernels accumulate in int32"
        return Int8Choices("tensorrt", "int8", True, bool(reduce_range), reasons)
    if activation_type == "auto":
        act = "uint8"
        reasons["activation_type"] = (
            f"uint8 (U8S8): {isa.path} multiplies u8 x s8 natively" if isa.arch == "x86_64" else
            f"uint8 (U8S8): onnxruntime's {isa.path} kernels take u8 and s8 activations alike")
    else:
        act = activation_type
        reasons["activation_type"] = "option activation_type"
    if reduce_range is None:
        reduce = isa.u8s8_saturates and act == "uint8"
        reasons["reduce_range"] = (
            f"7-bit weights after uint8 inputs with zero point >= 64: {isa.path} sums u8 x s8 pairs in int16"
            if reduce else f"8-bit weights: {isa.path} accumulates u8 x s8 in int32 (no int16 saturation)")
    else:
        reduce = bool(reduce_range)
        reasons["reduce_range"] = "option reduce_range"
    return Int8Choices(isa.path, act, False, reduce, reasons)
