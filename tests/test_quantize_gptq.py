"""GPTQ weight rounding (``quantize-int8(weight_rounding=gptq)``) and float nodes keeping their exact weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.errors import PassOptionError
from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.base import PassStats
from onnxforge.passes.quantize.calibrate import run_outputs
from onnxforge.passes.quantize.gptq import _Layer, gptq_round, objective


@pytest.fixture
def digits(trained_digits):
    """The trained digits CNN and its data (tests/conftest.py)."""
    return trained_digits


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _q(d, **opts):
    return create_pass("quantize-int8", opts, PassContext(calibration_data=d["calib"]))(_copy(d["model"]))


def test_gptq_round_beats_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    k, r, m = 24, 16, 2000
    mix = rng.normal(size=(k, k))
    x = mix @ rng.normal(size=(k, m))  # strongly correlated input columns
    h = (x @ x.T / m)[None]
    w = rng.normal(size=(1, r, k))
    s = np.abs(w).max(axis=2) / 127
    q = gptq_round(w, s, h, 127)
    assert q.shape == w.shape and np.all(np.abs(q) <= 127) and np.array_equal(q, np.rint(q))
    rtn = np.clip(np.rint(w / s[..., None]), -127, 127)
    e_gptq, e_rtn = objective(w, q * s[..., None], h), objective(w, rtn * s[..., None], h)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    assert np.array_equal(q, gptq_round(w, s, h, 127))  # deterministic
    # uncorrelated inputs with equal variance: nothing to compensate, GPTQ is round-to-nearest
    q_eye = gptq_round(w, s, np.eye(k)[None], 127, damp=0.0)
    assert np.array_equal(q_eye, rtn)


@pytest.mark.parametrize("group,stride,pad,dilation", [(1, 1, 1, 1), (1, 2, 0, 1), (4, 1, 1, 2), (8, 2, 1, 1)])
def test_im2col_columns_reproduce_the_convolution(group, stride, pad, dilation):
    import torch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 9, 11)).astype(np.float32)
    w = rng.normal(size=(8, 8 // group, 3, 3)).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad,
                                     dilation=dilation, groups=group).numpy()
    layer = _Layer(0, "c", "Conv", "x", "w", w, 0, group=group, kernel=(3, 3), strides=(stride, stride),
                   pads=(pad,) * 4, dilations=(dilation, dilation))
    cols = layer.columns(x, np.random.default_rng(0))  # (G, K, N * positions), positions in raster order
    got = layer.rows() @ cols  # (G, Cout/G, N * P)
    n, cout, ho, wo = ref.shape
    got = got.reshape(group, cout // group, n, ho * wo).transpose(2, 0, 1, 3).reshape(ref.shape)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_gptq_on_digits_within_bound_and_not_worse_than_nearest(digits):
    from onnxforge.testing import digits as dg

    nearest = _q(digits, calibration="minmax")
    gptq = _q(digits, calibration="minmax", weight_rounding="gptq")
    layers = sum(1 for n in digits["model"].graph if n.op_type in ("Conv", "Gemm"))
    assert gptq.stats.counts["gptq_layers"] + gptq.stats.counts.get("gptq_kept_nearest", 0) == layers
    assert gptq.stats.counts["gptq_layers"] >= 1
    assert gptq.stats.details["gptq"]["median_error_ratio_vs_nearest"] < 1.0
    # the int8 graph is the same (same scales, same Q/DQ), only the weight integers differ
    ops = lambda m: sorted(n.op_type for n in m.graph)  # noqa: E731
    assert ops(gptq.model) == ops(nearest.model)
    ints = lambda m, end: {k: v.const_value.numpy() for k, v in m.graph.initializers.items() if k.endswith(end)}  # noqa: E731
    w_near, w_gptq = ints(nearest.model, "weight_quantized"), ints(gptq.model, "weight_quantized")
    assert w_near.keys() == w_gptq.keys() and w_near
    assert any(not np.array_equal(w_near[k], w_gptq[k]) for k in w_near)  # GPTQ's integers are in the model
    s_near, s_gptq = ints(nearest.model, "weight_scale"), ints(gptq.model, "weight_scale")
    assert all(np.array_equal(s_near[k], s_gptq[k]) for k in s_near)  # with round-to-nearest's scales
    # network-level calibration objective: output error on the calibration data not worse than nearest
    feeds = digits["calib"]
    ref = run_outputs(digits["model"], feeds, optimize=False)
    err = lambda m: float(np.mean([np.mean((r[0] - o[0]) ** 2)  # noqa: E731
                                   for r, o in zip(ref, run_outputs(m, feeds, optimize=True))]))
    assert err(gptq.model) <= err(nearest.model) * 1.05, (err(gptq.model), err(nearest.model))
    # stated bound of quantize-int8: max abs error within 10 % of the output's magnitude; accuracy within 1 pt
    test = [{digits["name"]: digits["x"]}]
    r, o = run_outputs(digits["model"], test, optimize=False)[0][0], run_outputs(gptq.model, test, optimize=True)[0][0]
    assert np.max(np.abs(r - o)) <= 0.1 * np.max(np.abs(r))
    assert dg.accuracy(gptq.model, digits["x"], digits["y"]) >= digits["acc"] - 0.01


def test_nodes_left_float_keep_their_exact_weight_and_bias(digits):
    """A node dropped from the int8 set after bias correction / GPTQ (max_drop, latency guard) must
    keep its float weight and bias: the corrections belong to its int8 rounding, which it no longer has."""
    from onnxforge.ir.graph import const_value
    from onnxforge.passes.quantize.analysis import select
    from onnxforge.passes.quantize.bias_correction import bias_correction
    from onnxforge.passes.quantize.gptq import gptq_rounding

    p = create_pass("quantize-int8", {"calibration": "minmax"}, PassContext(calibration_data=digits["calib"]))
    model = _copy(digits["model"])
    stats = PassStats()
    qc = p.prepare(model, stats)
    chosen = select(model, qc.analysis, set(), target="cpu")
    qc.weight_rounding = gptq_rounding(qc, chosen, stats)
    qc.bias_delta = bias_correction(qc, chosen, stats)
    assert qc.weight_rounding and qc.bias_delta
    weighted = [i for i in sorted(chosen) if qc.analysis.infos[i].role == "weighted"]
    first = weighted[0]
    info = qc.analysis.infos[first]
    node = list(qc.fresh().graph)[first]
    w0, b0 = const_value(node.inputs[info.weight_input]), const_value(node.inputs[info.bias_input])
    built = qc.build(set(chosen) - {first})
    kept = next(n for n in built.graph if n.name == node.name)
    np.testing.assert_array_equal(const_value(kept.inputs[info.weight_input]), w0)
    np.testing.assert_array_equal(const_value(kept.inputs[info.bias_input]), b0)


def test_gptq_decision_record_replays_byte_identical(digits, tmp_path):
    path = str(tmp_path / "decisions.json")
    a = _q(digits, calibration="minmax", weight_rounding="gptq", bias_correction=True, decisions=path)
    b = _q(digits, calibration="minmax", weight_rounding="gptq", bias_correction=True, decisions=path)
    assert b.stats.details["decisions"]["source"].startswith("record")
    ser = lambda m: ir.serde.serialize_model(m).SerializeToString()  # noqa: E731
    assert ser(a.model) == ser(b.model)
    with pytest.raises(PassOptionError, match="other options"):
        _q(digits, calibration="minmax", bias_correction=True, decisions=path)


def test_weight_rounding_option_is_checked():
    with pytest.raises(PassOptionError, match="weight_rounding"):
        create_pass("quantize-int8", {"weight_rounding": "adaround"}, PassContext())
