"""Which op types stay in int8 inside an int8 region, decided from a measured microbenchmark.

onnxruntime 1.32's QDQ transformers (``qdq_selector_action_transformer.cc``) turn ``DQ -> op -> Q``
into an integer kernel for: Conv, MatMul, Gemm (QLinearConv, QLinearMatMul/MatMulIntegerToFloat,
QGemm); Add, Mul (QLinearAdd/Mul); Concat (QLinearConcat); AveragePool, GlobalAveragePool,
LeakyRelu, Sigmoid, Softmax (QLinear* unary ops); Where (QLinearWhere); and they drop the Q/DQ
around data movement run directly on uint8: Reshape, Transpose, Flatten, Squeeze, Unsqueeze,
Slice, Gather, Expand, Tile, Resize, MaxPool (opset >= 12), Split (equal qparams). HardSwish and
HardSigmoid have no integer kernel (HardSwish is decomposed, see :mod:`.analysis`).

A kernel existing is not enough: :data:`MEASURED` holds, per op type, the time of the op in int8
(fused) over the time of the same op in float between a DequantizeLinear and a QuantizeLinear
(what breaking the region costs), from ``bench/bench_int8_ops.py`` (shape 1x64x56x56, one thread).
An op type stays in int8 where its ratio is below 1 on the CPU's int8 path; the ratios of the
nearest measured path stand in for a path not measured yet (``NEAREST``).
"""

from __future__ import annotations

# bench/bench_int8_ops.py, onnxruntime 1.32.0, 1 thread, 1x64x56x56 uint8; one table per measured path.
MEASURED: dict[str, dict[str, float]] = {
    # Intel Xeon (Sapphire Rapids class: AVX-512 VNNI + AMX-INT8), 2 shared cores; --rounds 15, 2026-12-06.
    "amx": {
        "Sigmoid": 0.39, "LeakyRelu": 0.48, "Softmax": 2.31, "Add": 0.21, "Mul": 0.29, "Concat": 0.06,
        "AveragePool": 125.8,  # 3x3 stride 1 (stride 2: 6.1): QLinearAveragePool is a scalar kernel
        "GlobalAveragePool": 0.23,
        "MaxPool": 139.8,  # uint8 MaxPool 3x3 stride 1 (stride 2: 62; 2x2 stride 2: 10): no vector kernel
        "Resize": 1.09,  # nearest 2x: the uint8 Resize is no faster than float + Q/DQ
        "Transpose": 0.14, "Reshape": 0.14, "Slice": 0.12, "Split": 0.10,  # Q/DQ dropped, uint8 copy
        "HardSwish": 0.39,  # decomposed: QLinearAdd, Clip in the Q range, QLinearMul, /6 in a DQ scale
        "HardSigmoid": 1.28,  # decomposed QLinearAdd alone loses to the float HardSigmoid
    },
    # AMD EPYC (Zen 4 class: AVX-512 VNNI, no AMX), 2 cores, quiet; --rounds 60, 2026-12-07.
    # Same verdicts as the AMX table except HardSigmoid: its decomposed QLinearAdd pays here (0.84-0.86
    # in 6 of 7 runs; 1.19 once, inside the full table's run).
    "avx512_vnni": {
        "Sigmoid": 0.50, "LeakyRelu": 0.66, "Softmax": 2.77, "Add": 0.34, "Mul": 0.47, "Concat": 0.13,
        "AveragePool": 14.1, "GlobalAveragePool": 0.17, "MaxPool": 27.0, "Resize": 1.20,
        "Transpose": 0.19, "Reshape": 0.19, "Slice": 0.15, "Split": 0.15,
        "HardSwish": 0.61, "HardSigmoid": 0.85,
    },
}
# A path not measured uses the table of the nearest one: the element-wise int8 kernels are the same
# AVX2/AVX-512 code on every x86 path (AMX only changes the matrix kernels), so x86 without AMX takes
# the AVX-512 VNNI table; ARM (not measured) takes the AMX one.
NEAREST = {"amx": "amx", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx512_vnni", "avx512": "avx512_vnni",
           "avx2": "avx512_vnni", "sse": "avx512_vnni", "arm_i8mm": "amx", "arm_dot": "amx", "neon": "amx",
           "generic": "amx", "tensorrt": "amx"}
# Ops that never appear in the benchmark but have int8 handling with no arithmetic (the Q/DQ pair is
# dropped): same cost class as Reshape.
SAME_AS = {"Flatten": "Reshape", "Squeeze": "Reshape", "Unsqueeze": "Reshape"}


def table(path: str) -> tuple[str, dict[str, float]]:
    """``(measured path, {op_type: int8 / float-in-region time})`` for a CPU int8 path."""
    key = NEAREST.get(path, "amx")
    return key, MEASURED[key]


def pays(op_type: str, path: str) -> tuple[bool, str]:
    """Whether ``op_type`` runs faster in int8 than as a float op inside an int8 region, and why."""
    key, t = table(path)
    ratio = t.get(SAME_AS.get(op_type, op_type))
    if ratio is None:
        return False, f"{op_type}: no int8 measurement on {key}"
    where = key if key == path else f"{key} (nearest measured to {path})"
    if ratio < 1.0:
        return True, f"{op_type} in int8 takes {ratio:.2f}x the time of a float {op_type} between DQ/Q on {where}"
    return False, (f"{op_type} stays float: onnxruntime's int8 {op_type} measured {ratio:.2f}x slower than "
                   f"a float one between DQ/Q on {where} (bench/bench_int8_ops.py)")
