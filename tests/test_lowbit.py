"""quantize-weights-ternary / -binary: the math, the packing, and the packed weights' numerics.

Numerics: the rewritten model (MatMulNBits bits=2, or the packed constant + unpack subgraph) must give,
in onnxruntime at fp32 tolerance, the outputs of the original graph with each weight replaced by the
dequantized ``alpha * t`` computed in numpy: the packing is lossless, only the rounding to
{-1, 0, +1} is lossy. Accuracy on the trained demo model is a stated bound.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.ir.graph import const_value
from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.lowbit import binarize, pack_codes, ternarize, unpack_codes
from onnxforge.testing.numerics import op_count, random_inputs, run


def _clone(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("n", [1, 7, 8, 33])
def test_pack_roundtrip(bits, n):
    codes = np.random.default_rng(n).integers(0, 1 << bits, size=n).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.size == -(-n * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), codes)


def test_ternarize_twn_math():
    w = np.array([[0.1, -1.0, 2.0, 0.0], [0.5, 0.5, -0.5, 0.01]], np.float32)
    codes, alpha = ternarize(w, axis=0)
    # row 0: mean|w| = 0.775, delta = 0.5425 -> keep -1.0, 2.0; alpha = 1.5
    np.testing.assert_array_equal(codes[0], [0, -1, 1, 0])
    np.testing.assert_allclose(alpha[0], 1.5)
    # row 1: mean|w| = 0.3775, delta = 0.26425 -> keep the three 0.5s; alpha = 0.5
    np.testing.assert_array_equal(codes[1], [1, 1, -1, 0])
    np.testing.assert_allclose(alpha[1], 0.5)
    codes, alpha = ternarize(w, axis=1)  # per column
    assert alpha.shape == (4,) and set(np.unique(codes)) <= {-1, 0, 1}


def test_binarize_xnor_math():
    w = np.array([[0.0, -1.0, 3.0]], np.float32)
    codes, alpha = binarize(w, axis=0)
    np.testing.assert_array_equal(codes, [[1, -1, 1]])  # sign(0) = +1
    np.testing.assert_allclose(alpha, [4.0 / 3.0])
    # alpha is the least-squares scale for sign codes: d/da |w - a t|^2 = 0
    a = float((w * codes).sum() / (codes.astype(np.float32) ** 2).sum())
    np.testing.assert_allclose(alpha[0], a, rtol=1e-6)


def _by_name(model, feeds):
    return dict(zip((v.name for v in model.graph.outputs), run(model, feeds)))


def _expected(model, quantizer):
    """``model`` with every quantized layer's weight replaced by ``alpha * t`` (plain float graph)."""
    ref = _clone(model)
    for node in ref.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            continue
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)) else 1
        codes, alpha = quantizer(w, axis)
        shape = [1] * w.ndim
        shape[axis] = -1
        node.inputs[1].const_value = ir.tensor((codes * alpha.reshape(shape)).astype(np.float32))
    return ref


@pytest.mark.parametrize("mode", ["ternary", "binary"])
@pytest.mark.parametrize("nbits", [True, False])
@pytest.mark.parametrize("name", ["digits_cnn", "mlp"])
def test_packed_weights_match_numpy_dequantized(zoo_model, mode, nbits, name):
    model = zoo_model(name)
    folded = create_pass("fold-batchnorm", {}, PassContext())(_clone(model)).model
    q = create_pass(f"quantize-weights-{mode}", {"keep_first_last": False, "matmul_nbits": nbits},
                    PassContext(target="cpu"))(_clone(folded))
    assert q.modified
    stats = q.stats
    assert stats.details["weight_bytes_after"] < stats.details["weight_bytes_before"] / 4
    if nbits:  # both models end in a Gemm
        assert op_count(q.model, "MatMulNBits", "com.microsoft") >= 1
    else:
        assert op_count(q.model, "MatMulNBits", "com.microsoft") == 0
    if name == "digits_cnn":
        assert op_count(q.model, "BitShift") >= 5
    expected = _expected(folded, ternarize if mode == "ternary" else binarize)
    feeds = random_inputs(folded, seed=1, default_dim=3)
    got, want = _by_name(q.model, feeds), _by_name(expected, feeds)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_keep_first_last_and_skip_reasons(zoo_model):
    model = zoo_model("digits_cnn")
    r = create_pass("quantize-weights-ternary", {}, PassContext())(model)
    reasons = [s.reason for s in r.stats.skipped]
    assert sum("first/last" in why for why in reasons) == 2
    # digits_cnn: 5 Conv + 1 Gemm; first Conv and the Gemm stay float
    assert op_count(r.model, "Gemm") == 1 and op_count(r.model, "MatMulNBits", "com.microsoft") == 0
    assert op_count(r.model, "BitShift") == 4


def test_target_onnx_uses_standard_ops_only(zoo_model):
    model = zoo_model("mlp")
    r = create_pass("quantize-weights-ternary", {"keep_first_last": False}, PassContext(target="onnx"))(model)
    assert r.modified and all(n.domain in ("", "ai.onnx") for n in r.model.graph)


def test_ternary_demo_accuracy_bound(demo_model_path, demo_data_path):
    from onnxforge.api import optimize
    from onnxforge.testing.digits import accuracy

    data = np.load(demo_data_path)
    fp32 = accuracy(str(demo_model_path), data["x_test"], data["y_test"])
    ternary = optimize(str(demo_model_path), "O1,quantize-weights-ternary").model
    binary = optimize(str(demo_model_path), "O1,quantize-weights-binary").model
    t_acc = accuracy(ternary, data["x_test"], data["y_test"])
    b_acc = accuracy(binary, data["x_test"], data["y_test"])
    # post-training, no fine-tuning: ternary keeps most of the accuracy, binary much less (BENCHMARKS.md)
    assert fp32 > 0.95 and t_acc > 0.6 and b_acc > 0.15 and t_acc > b_acc, (fp32, t_acc, b_acc)


def test_old_opset_conv_is_skipped_with_a_reason(zoo_model):
    from onnxforge.testing import zoo

    model = zoo.export_model("conv_bn", opset=13, dynamo=False)  # TorchScript exporter, opset 13
    r = create_pass("quantize-weights-ternary", {"keep_first_last": False}, PassContext())(model)
    assert not r.modified
    assert any("opset >= 18" in s.reason for s in r.stats.skipped)
