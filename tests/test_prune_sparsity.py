"""prune-magnitude and sparsity-2-4: zero fractions, the 2:4 pattern, compressed size."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxforge.passes import create_pass
from onnxforge.testing import numerics

import torch
from onnxforge.testing import zoo


@pytest.fixture(scope="module")
def mlp():
    return zoo.export_model("mlp", opset=17, dynamo=False)


def _copy(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _weights(model):
    return [n.inputs[1].const_value.numpy() for n in model.graph if n.op_type in ("Gemm", "MatMul", "Conv")]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_magnitude(mlp, scope):
    model = _copy(mlp)
    stats = create_pass("prune-magnitude", {"ratio": 0.6, "scope": scope})(model).stats
    assert 0.59 <= stats.details["zero_fraction"] <= 0.62
    assert stats.details["gzip_bytes_after"] < 0.75 * stats.details["gzip_bytes_before"]
    if scope == "layer":
        for w in _weights(model):
            assert 0.55 <= (w == 0).mean() <= 0.65
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    feeds = numerics.random_inputs(model)
    assert numerics.run(model, feeds)[0].shape == numerics.run(mlp, feeds)[0].shape


def test_sparsity_2_4_pattern(mlp):
    model = _copy(mlp)
    original = _weights(mlp)
    stats = create_pass("sparsity-2-4", {"min_size": 1})(model).stats
    assert stats.details["zero_fraction"] >= 0.49
    for node, before in zip([n for n in model.graph if n.op_type == "Gemm"], original):
        w = node.inputs[1].const_value.numpy()  # torch Linear: [out, in] with transB=1
        if w.shape[1] % 4:
            continue
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) <= 2).all()
        # the survivors are the 2 largest of each group
        b = np.abs(before.reshape(groups.shape))
        kept = np.abs(groups)
        assert np.all(kept.max(-1) == b.max(-1))
    assert stats.details["gzip_bytes_after"] < stats.details["gzip_bytes_before"]
