"""Quantization passes: ``quantize-int8`` (static QDQ), ``quantize-dynamic``, ``quantize-weights-int4``.

Importing this package registers the passes. The arithmetic is in :mod:`.qmath`, calibration in
:mod:`.calibrate`, the accuracy fallback and latency guard of ``quantize-int8`` in :mod:`.fallback`.
"""

from onnxforge.passes.quantize.dynamic import QuantizeDynamicPass
from onnxforge.passes.quantize.qdq import QuantizeInt8Pass
from onnxforge.passes.quantize.weight_only import QuantizeWeightsInt4Pass

__all__ = ["QuantizeDynamicPass", "QuantizeInt8Pass", "QuantizeWeightsInt4Pass"]
