"""quantize-int8's accuracy fallback (max_drop) and latency guard."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.quantize.calibrate import run_outputs
from onnxforge.passes.quantize.qmath import cosine


@pytest.fixture(scope="session")
def outlier_mlp():
    """An MLP whose first layer reads an input with one feature 1000x the others.

    The network's function is ordinary (fc1's weights for that feature are scaled down by 1000),
    but quantizing fc1's input per-tensor leaves the other 15 features about one uint8 level:
    fc1 is the one sensitive layer."""
    import torch
    from onnxforge.testing import zoo

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10)).eval()
    with torch.no_grad():
        mlp[0].weight[:, 0] /= 1000.0
    model = zoo.export_model(mlp, (torch.zeros(4, 16),))
    rng = np.random.default_rng(0)
    name = model.graph.inputs[0].name

    def batch():
        x = rng.standard_normal((8, 16)).astype(np.float32)
        x[:, 0] *= 1000.0
        return {name: x}

    calib = [batch() for _ in range(8)]
    names = [n.name for n in model.graph if n.op_type in ("Gemm", "MatMul")]
    return model, calib, names


def _q(model, calib, **opts):
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    return create_pass("quantize-int8", opts, PassContext(calibration_data=calib))(model)


def _drop(ref, cand, feeds):
    a = run_outputs(ref, feeds, optimize=False)
    b = run_outputs(cand, feeds)
    return 1.0 - float(np.mean([cosine(x[0], y[0]) for x, y in zip(a, b)]))


def _float_gemms(model):
    return [n.name for n in model.graph if n.op_type in ("Gemm", "MatMul") and n.inputs[1].producer() is None]


def test_all_int8_breaks_the_budget(outlier_mlp):
    model, calib, names = outlier_mlp
    r = _q(model, calib)
    assert _float_gemms(r.model) == []
    assert _drop(model, r.model, calib) > 0.01


def test_max_drop_keeps_the_sensitive_layer_float(outlier_mlp):
    model, calib, names = outlier_mlp
    r = _q(model, calib, max_drop=0.01)
    fb = r.stats.details["fallback"]
    assert fb["drop_all_int8"] > 0.01
    assert _float_gemms(r.model) == [names[0]], fb
    assert fb["kept_float"] == [names[0]]
    assert fb["drop_final"] <= 0.01
    assert _drop(model, r.model, calib) <= 0.01  # measured independently
    assert any("max_drop" in s.reason and s.node == names[0] for s in r.stats.skipped)


def test_max_drop_with_user_metric(outlier_mlp):
    model, calib, names = outlier_mlp
    ref = run_outputs(model, calib, optimize=False)
    labels = [o[0].argmax(1) for o in ref]

    def agreement(outputs, feeds):
        return float(np.mean([np.mean(o[0].argmax(1) == y) for o, y in zip(outputs, labels)]))

    model2 = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    ctx = PassContext(calibration_data=calib, options={"metric": agreement, "eval_data": calib})
    r = create_pass("quantize-int8", {"max_drop": 0.0}, ctx)(model2)
    assert r.stats.details["fallback"]["measure"] == "metric"
    assert r.stats.details["fallback"]["drop_final"] <= 0.0


def test_latency_guard_reports_and_is_consistent(outlier_mlp):
    model, calib, names = outlier_mlp
    r = _q(model, calib, latency_guard=True)
    rep = r.stats.details["latency_guard"]
    q_nodes = sum(1 for n in r.model.graph if n.op_type == "QuantizeLinear")
    # one connected int8 region: only the whole-model decision, with its interval
    assert rep["regions"] == []
    m = rep["model"]
    assert m["lo"] <= m["ratio"] <= m["hi"] and m["rounds"] >= 10
    if m["decision"] == "int8":
        assert m["hi"] < 0.97 and q_nodes > 0
    else:
        # thin model: int8 not faster beyond the noise -> stays float, and says why
        assert q_nodes == 0
        assert any("latency guard" in s for s in r.stats.notes + [s.reason for s in r.stats.skipped])
        assert all("latency guard" in why for why in r.stats.details["kept_float"].values())


def test_expected_flips_is_smooth_and_in_top1_units():
    from onnxforge.passes.quantize.fallback import expected_flips, is_classifier

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)) * 3.0
    ref = [[logits[i : i + 1]] for i in range(64)]
    assert is_classifier(ref)
    assert not is_classifier([[np.zeros((1, 8, 85), np.float32)]])  # a detector's map
    assert expected_flips(ref, ref) == 0.0
    noise = rng.normal(size=logits.shape)
    drops = [expected_flips(ref, [[logits[i : i + 1] + e * noise[i : i + 1]] for i in range(64)])
             for e in (0.01, 0.1, 1.0, 100.0)]
    assert drops == sorted(drops) and drops[0] < 0.01 and 0.5 < drops[-1] <= 1.0, drops
    # same order of magnitude as the realised flip rate on many samples
    big = rng.normal(size=(4000, 10)) * 3.0
    err = 0.5 * rng.normal(size=big.shape)
    realised = float(np.mean(big.argmax(1) != (big + err).argmax(1)))
    predicted = expected_flips([[big]], [[big + err]])
    assert 0.5 * realised <= predicted <= 2.0 * realised, (predicted, realised)
    # a softmax output is compared in log space: the same logits give the same estimate
    soft = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    assert np.isclose(expected_flips([[soft(big)]], [[soft(big + err)]]), predicted, rtol=1e-6)


def test_max_drop_on_a_classifier_uses_expected_flips(outlier_mlp):
    model, calib, names = outlier_mlp
    r = _q(model, calib, max_drop=0.01)
    fb = r.stats.details["fallback"]
    assert fb["measure"] == "expected top-1 flips" and fb["samples"] == len(calib)
    from onnxforge.passes.quantize.fallback import expected_flips

    ref = run_outputs(model, calib, optimize=False)
    assert expected_flips(ref, run_outputs(r.model, calib)) <= 0.01  # measured independently
