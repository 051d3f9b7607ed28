"""ISA detection from CPU flags (faked) and the int8 choices quantize-int8 derives from it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.quantize import kernels
from onnxforge.passes.quantize.isa import choose
from onnxforge.runtime.cpu import detect_isa

EPYC_AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2".split()
SKYLAKE_SP = EPYC_AVX2 + "avx512f avx512bw avx512dq avx512vl".split()
CASCADE_LAKE = SKYLAKE_SP + ["avx512_vnni"]
ALDER_LAKE = EPYC_AVX2 + ["avx_vnni"]
SAPPHIRE_RAPIDS = CASCADE_LAKE + "amx_bf16 amx_tile amx_int8".split()
GRAVITON2 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp".split()
GRAVITON3 = GRAVITON2 + ["i8mm", "sve"]


@pytest.mark.parametrize("flags,arch,path,saturates", [
    (EPYC_AVX2, "x86_64", "avx2", True),
    (SKYLAKE_SP, "x86_64", "avx512", True),
    (CASCADE_LAKE, "x86_64", "avx512_vnni", False),
    (ALDER_LAKE, "x86_64", "avx_vnni", False),
    (SAPPHIRE_RAPIDS, "x86_64", "amx", False),
    (GRAVITON2, "arm64", "arm_dot", False),
    (GRAVITON3, "arm64", "arm_i8mm", False),
    ([], "riscv64", "generic", False),
])
def test_detect_isa_from_flags(flags, arch, path, saturates):
    isa = detect_isa(flags, arch=arch)
    assert isa.path == path
    assert isa.u8s8_saturates is saturates


def test_amx_needs_the_int8_tiles():
    assert detect_isa(CASCADE_LAKE + ["amx_bf16", "amx_tile"], arch="x86_64").path == "avx512_vnni"


def test_this_machine_is_detected():
    isa = detect_isa()
    assert isa.path in {"amx", "avx512_vnni", "avx_vnni", "avx512", "avx2", "sse", "arm_i8mm", "arm_dot", "neon",
                        "generic"}


def test_choices_follow_the_int8_path():
    avx2 = choose(detect_isa(EPYC_AVX2, arch="x86_64"))
    vnni = choose(detect_isa(CASCADE_LAKE, arch="x86_64"))
    arm = choose(detect_isa(GRAVITON2, arch="arm64"))
    assert avx2.reduce_range and "int16" in avx2.reasons["reduce_range"]
    assert not vnni.reduce_range and "int32" in vnni.reasons["reduce_range"]
    assert not arm.reduce_range
    assert avx2.activation_type == vnni.activation_type == "uint8"
    # explicit options win over the ISA
    assert choose(detect_isa(CASCADE_LAKE, arch="x86_64"), reduce_range=True).reduce_range
    assert not choose(detect_isa(EPYC_AVX2, arch="x86_64"), reduce_range=False).reduce_range
    trt = choose(detect_isa(CASCADE_LAKE, arch="x86_64"), target="tensorrt")
    assert trt.activation_type == "int8" and trt.symmetric


def test_op_table_decides_by_measurement():
    ok, why = kernels.pays("Sigmoid", "amx")
    assert ok and "0.39" in why
    ok, why = kernels.pays("MaxPool", "amx")
    assert not ok and "slower" in why
    ok, why = kernels.pays("Softmax", "avx2")  # an unmeasured path uses the nearest measured table
    assert not ok and "nearest" in why
    assert kernels.pays("Flatten", "amx")[0]  # same cost class as Reshape
    # the tables differ where the measurements do: HardSigmoid's integer expansion pays on the
    # AVX-512 VNNI (Zen 4) table, not on the AMX one
    assert kernels.pays("HardSigmoid", "avx512_vnni")[0]
    assert not kernels.pays("HardSigmoid", "amx")[0]
    assert kernels.table("avx2")[0] == "avx512_vnni" and kernels.table("arm_dot")[0] == "amx"


@pytest.fixture(scope="session")
def centred_input_cnn():
    """A conv reading an input centred on 0 (uint8 zero point ~128): the u8s8 saturation case."""
    import torch
    from onnxforge.testing import zoo

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    model = zoo.export_model(net, (torch.zeros(1, 3, 8, 8),))
    rng = np.random.default_rng(0)
    calib = [{model.graph.inputs[0].name: rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    return model, calib


def _first_weight_max(model) -> int:
    for n in model.graph:
        if n.op_type == "Conv":
            q = n.inputs[1].producer().inputs[0].const_value.numpy()
            return int(np.abs(q).max())
    raise AssertionError("no conv")


@pytest.mark.parametrize("flags,bits", [(EPYC_AVX2, 63), (SAPPHIRE_RAPIDS, 127)])
def test_weight_range_follows_the_faked_cpu(centred_input_cnn, monkeypatch, flags, bits):
    from onnxforge.passes.quantize import qdq

    model, calib = centred_input_cnn
    monkeypatch.setattr(qdq, "detect_isa", lambda: detect_isa(flags, arch="x86_64"))
    m = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    r = create_pass("quantize-int8", {}, PassContext(calibration_data=calib))(m)
    assert _first_weight_max(r.model) == bits
    isa = r.stats.details["isa"]
    assert isa["detected"]["path"] == ("avx2" if bits == 63 else "amx")
    assert isa["choices"]["reduce_range"] is (bits == 63)
