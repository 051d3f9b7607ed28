"""quantize-dynamic and quantize-weights-int4 on the zoo's BERT-style encoder (and a CNN for the skip)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.quantize.qmath import cosine
from onnxforge.passes.quantize.weight_only import dequantize_blocks, pack_nibbles, quantize_blocks
from onnxforge.testing.numerics import op_count, run


def _clone(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.fixture(scope="session")
def bert():
    import torch  # noqa: F401
    from onnxforge.testing import zoo

    model = zoo.export_model("bert_encoder")
    feeds = [zoo.feeds("bert_encoder", batch=2, seq=16, seed=s) for s in range(3)]
    return model, feeds


def _ort(model, feeds, optimize=True):
    from onnxforge.passes.quantize.calibrate import make_session

    sess = make_session(model, optimize=optimize)
    return sess.run(None, feeds)[0]


def _min_cosine(ref, cand, feeds):
    return min(cosine(_ort(ref, f, optimize=False), _ort(cand, f)) for f in feeds)


@pytest.mark.parametrize("contrib", ["no", "yes"])
def test_dynamic_cosine(bert, contrib):
    model, feeds = bert
    n_mm = sum(1 for n in model.graph if n.op_type in ("MatMul", "Gemm"))
    r = create_pass("quantize-dynamic", {"contrib": contrib}, PassContext(target="cpu"))(_clone(model))
    assert r.modified
    q = r.model
    if contrib == "yes":
        assert op_count(q, "DynamicQuantizeMatMul", "com.microsoft") >= 4
    else:
        assert op_count(q, "MatMulInteger") >= 4 and all(n.domain in ("", "ai.onnx") for n in q.graph)
        # one DynamicQuantizeLinear per input tensor: Q/K/V share theirs
        assert op_count(q, "DynamicQuantizeLinear") < op_count(q, "MatMulInteger")
    # attention MatMuls (two activations) stay float and are reported
    assert any("two activations" in s.reason for s in r.stats.skipped)
    assert sum(1 for n in q.graph if n.op_type in ("MatMul", "Gemm")) < n_mm
    cos = _min_cosine(model, q, feeds)
    assert cos >= 0.99, cos


def test_dynamic_skips_convolutions():
    import torch  # noqa: F401
    from onnxforge.testing import zoo

    model = zoo.export_model("digits_cnn")
    r = create_pass("quantize-dynamic", {}, PassContext())(model)
    assert op_count(r.model, "Conv") == 5
    assert sum("convolutions" in s.reason for s in r.stats.skipped) == 5


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matmulnbits_runs(bert, symmetric):
    model, feeds = bert
    r = create_pass("quantize-weights-int4", {"symmetric": symmetric, "block_size": 32}, PassContext())(_clone(model))
    q = r.model
    assert op_count(q, "MatMulNBits", "com.microsoft") >= 4
    cos = _min_cosine(model, q, feeds)
    assert cos >= 0.98, cos
    # the packed weights are ~1/8 of the fp32 bytes (+ scales)
    size = lambda m: len(ir.serde.serialize_model(m).SerializeToString())  # noqa: E731
    assert size(q) < size(model)


def test_int4_block_math_matches_onnxruntime():
    """MatMulNBits in onnxruntime computes X @ dequantize(our packing) (checks nibble order, zps)."""
    import onnx
    import onnx.helper as h

    rng = np.random.default_rng(0)
    k, n, bs = 40, 6, 16  # K not a multiple of the block: padding path
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    q, s, z = quantize_blocks(w, bs, symmetric=False)
    w_deq = dequantize_blocks(q, s, z, k)
    assert np.max(np.abs(w_deq - w)) <= np.max(s) / 2 + 1e-6
    inits = [onnx.numpy_helper.from_array(pack_nibbles(q), "B"), onnx.numpy_helper.from_array(s.reshape(-1), "S"),
             onnx.numpy_helper.from_array(pack_nibbles(z).reshape(-1), "Z")]
    node = h.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)
    g = h.make_graph([node], "g", [h.make_tensor_value_info("x", 1, [3, k])], [h.make_tensor_value_info("y", 1, [3, n])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    y = run(m, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w_deq, rtol=1e-3, atol=1e-3)


def test_int4_refuses_onnx_target(bert):
    model, _ = bert
    with pytest.raises(Exception, match="MatMulNBits"):
        create_pass("quantize-weights-int4", {}, PassContext(target="onnx"))(_clone(model))


def _mlp_at_opset(zoo_model, opset: int):
    model = zoo_model("mlp", opset=opset, dynamo=False)  # TorchScript exports at old opsets
    assert model.opset_imports[""] == opset
    return model


def test_dynamic_upgrades_an_old_opset(zoo_model):
    """DynamicQuantizeLinear needs opset 11: an opset-10 model is upgraded (and says so)."""
    from onnxforge.testing.numerics import random_inputs

    model = _mlp_at_opset(zoo_model, 10)
    feeds = random_inputs(model, seed=0)
    ref = run(_clone(model), feeds)
    result = create_pass("quantize-dynamic", {}, PassContext())(model)
    assert model.opset_imports[""] >= 11 and result.stats.counts["opset_upgraded"] == 1
    assert op_count(model, "DynamicQuantizeLinear") >= 1
    assert cosine(ref[0], run(model, feeds)[0]) > 0.99


def test_dynamic_refuses_when_the_opset_upgrade_fails(zoo_model, monkeypatch):
    """A failed upgrade used to be ignored, leaving opset-11 ops in an opset-10 model."""
    from onnxforge.errors import UnsupportedModelError
    from onnxforge.passes.quantize import dynamic

    def failing_upgrade(model, version, stats):
        stats.note(f"opset upgrade 10 -> {version} failed (ValueError: converter says no)")
        return False

    monkeypatch.setattr(dynamic, "upgrade_opset", failing_upgrade)
    model = _mlp_at_opset(zoo_model, 10)
    with pytest.raises(UnsupportedModelError, match=r"opset >= 11.*opset 10.*converter says no"):
        create_pass("quantize-dynamic", {}, PassContext())(model)


def test_contrib_takes_only_yes_or_no():
    """``contrib="auto"`` used to be accepted and silently meant ``"no"``: it is now a clear error."""
    from onnxforge.errors import PassOptionError
    from onnxforge.passes import create_pass

    with pytest.raises(PassOptionError):
        create_pass("quantize-dynamic", {"contrib": "auto"})
    assert create_pass("quantize-dynamic", {"contrib": "yes"}).contrib == "yes"
