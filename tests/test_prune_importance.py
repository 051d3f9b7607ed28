"""Importance criteria on the trained digits CNN: the output-error (``reconstruction``) criterion."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.prune.dependency import analyze
from onnxforge.passes.prune.importance import class_scores
from onnxforge.runtime.activations import collect
from onnxforge.testing import digits

MODEL = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def setup():
    return digits.bundled_model_and_data()


def _copy(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def test_reconstruction_score_is_input_energy_times_weight_column_norm(setup):
    # A group with one consumer: node_conv2d_2 (32 -> 32) is read only by node_conv2d_3.
    model, calib, _, _ = setup
    dep = analyze(_copy(model))
    scores, notes = class_scores(dep, "reconstruction", PassContext(calibration_data=calib))
    assert not notes
    g = next(g for g in dep.groups() if g.name == "node_conv2d_2")
    consumer = dep.model.graph.node("node_conv2d_3")
    x = np.concatenate(collect(model, calib, [consumer.inputs[0].name])[consumer.inputs[0].name]).astype(np.float64)
    energy = (x ** 2).mean(axis=(0, 2, 3))
    w = consumer.inputs[1].const_value.numpy().astype(np.float64)
    expected = energy * (w ** 2).sum(axis=(0, 2, 3))
    expected = expected / expected.mean()
    roots = dep.roots()
    got = np.array([scores[r] for r in roots[g.spaces[0].elems]])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_reconstruction_beats_random_on_trained_weights(setup):
    # Measured (no re-fit, ratio 0.3): reconstruction 0.394, random 0.108 (fp32 0.994).
    model, calib, x_test, y_test = setup
    acc = {}
    for crit in ("reconstruction", "random"):
        m = _copy(model)
        create_pass("prune-channels", {"ratio": 0.3, "criterion": crit}, PassContext(calibration_data=calib))(m)
        acc[crit] = digits.accuracy(m, x_test, y_test)
    print(f"\ndigits ratio 0.3, no reconstruct: {acc}")
    assert acc["reconstruction"] > acc["random"] + 0.1, acc


def test_reconstruction_needs_calibration_data(setup):
    from onnxforge.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError):
        create_pass("prune-channels", {"criterion": "reconstruction"}, PassContext())(_copy(setup[0]))
