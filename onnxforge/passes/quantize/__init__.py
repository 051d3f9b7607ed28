"""Quantization passes: ``quantize-int8`` (static QDQ), ``quantize-dynamic``, ``quantize-weights-int4``.

Importing this package registers the passes. The arithmetic is in :mod:`.qmath`, calibration in
:mod:`.calibrate`; ``quantize-int8`` is :mod:`.qdq` over :mod:`.analysis`, :mod:`.plan`,
:mod:`.rewrite`, with its int8 op table in :mod:`.kernels`, its CPU choices in :mod:`.isa`, and its
decisions in :mod:`.bias_correction`, :mod:`.fallback` (accuracy), :mod:`.guard` (latency) and
:mod:`.decisions` (the replayable record).
"""

from onnxforge.passes.quantize.dynamic import QuantizeDynamicPass
from onnxforge.passes.quantize.qdq import QuantizeInt8Pass
from onnxforge.passes.quantize.weight_only import QuantizeWeightsInt4Pass

__all__ = ["QuantizeDynamicPass", "QuantizeInt8Pass", "QuantizeWeightsInt4Pass"]
