"""Accuracy without training: bias correction on the trained digits CNN, per-tensor calibration by SQNR."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.quantize.calibrate import RangeReducer, run_outputs


@pytest.fixture
def digits(trained_digits):
    """The trained digits CNN and its data (tests/conftest.py)."""
    return trained_digits


def _q(d, **opts):
    m = ir.serde.deserialize_model(ir.serde.serialize_model(d["model"]))
    return create_pass("quantize-int8", opts, PassContext(calibration_data=d["calib"]))(m)


def _logit_mean_shift(d, q_model) -> float:
    """Mean over classes of |E[logit_float - logit_int8]| on the test set (int8 with onnxruntime's fusion)."""
    feeds = [{d["name"]: d["x"]}]
    ref = run_outputs(d["model"], feeds, optimize=False)[0][0]
    got = run_outputs(q_model, feeds, optimize=True)[0][0]
    return float(np.mean(np.abs((ref - got).mean(axis=0))))


def test_bias_correction_on_digits(digits):
    from onnxforge.testing import digits as dg

    plain = _q(digits, calibration="minmax")
    corrected = _q(digits, calibration="minmax", bias_correction=True)
    layers = sum(1 for n in digits["model"].graph if n.op_type in ("Conv", "Gemm"))
    assert corrected.stats.counts["biases_corrected"] == layers
    bc = corrected.stats.details["bias_correction"]
    assert bc["layers"] == layers and bc["max_shift_over_max_bias"] > 0
    # the int8 weights' mean error is what it removes: the logits' mean shift gets smaller
    before, after = _logit_mean_shift(digits, plain.model), _logit_mean_shift(digits, corrected.model)
    assert after < before, (before, after)
    # and the task metric stays within 1 point of fp32 (stated bound of quantize-int8 on digits)
    acc = dg.accuracy(corrected.model, digits["x"], digits["y"])
    assert acc >= digits["acc"] - 0.01, (acc, digits["acc"])


def test_bias_correction_changes_only_biases(digits):
    plain = _q(digits)
    corrected = _q(digits, bias_correction=True)
    a = {k: v.const_value.numpy() for k, v in plain.model.graph.initializers.items()}
    b = {k: v.const_value.numpy() for k, v in corrected.model.graph.initializers.items()}
    assert a.keys() == b.keys()
    changed = sorted(k for k in a if not np.array_equal(a[k], b[k]))
    # int32 = the quantized biases (BatchNorm folding renamed some); int8 weights and every scale identical
    assert changed and all(a[k].dtype == np.int32 for k in changed), changed


def test_sqnr_picks_a_clipped_range_for_outliers_and_full_range_otherwise():
    rng = np.random.default_rng(0)
    heavy = RangeReducer()
    x = rng.standard_t(2, 200_000).astype(np.float32)  # heavy tails: a few values 100x the bulk
    heavy.update(x)
    method, (lo, hi) = heavy.best_range()
    # SQNR weighs errors by energy: it clips the rarest tail only (not the bulk's 99.9%)
    assert method != "minmax" and hi < 0.9 * heavy.max and lo > 0.9 * heavy.min, (method, lo, hi)
    uniform = RangeReducer()
    uniform.update(rng.uniform(-1, 1, 200_000).astype(np.float32))
    method, (lo, hi) = uniform.best_range()
    assert hi > 0.99 and lo < -0.99, (method, lo, hi)  # no tails to cut: (nearly) the full range
    assert heavy.sqnr(*heavy.best_range()[1]) >= heavy.sqnr(heavy.min, heavy.max)


def test_sqnr_calibration_reports_its_choices_and_keeps_accuracy(digits):
    from onnxforge.testing import digits as dg

    r = _q(digits, calibration="sqnr")
    picked = r.stats.details["calibration_choices"]
    assert sum(picked.values()) > 0 and set(picked) <= {"minmax", "entropy", "percentile(99.9)",
                                                         "percentile(99.99)", "percentile(99.999)"}
    assert dg.accuracy(r.model, digits["x"], digits["y"]) >= digits["acc"] - 0.01


def test_o3_budget_in_expected_accuracy_holds_on_digits_test_labels(digits):
    """O3's int8 (``budget_unit=accuracy``) on the trained digits CNN: the budget is read in expected
    accuracy, and the accuracy against the true labels of the test split stays within its 1 point."""
    from onnxforge.passes.spec import PRESETS, parse_pipeline
    from onnxforge.testing import digits as dg

    spec = parse_pipeline(PRESETS["O3"])[-1]
    assert spec.name == "quantize-int8" and spec.options["budget_unit"] == "accuracy"
    opts = {k: v for k, v in spec.options.items() if k != "latency_guard"}  # timing is not this test's subject
    result = _q(digits, **opts)
    fb = result.stats.details["fallback"]
    assert fb["measure"] == "expected top-1 accuracy lost" and fb["drop_final"] <= 0.01
    acc = dg.accuracy(result.model, digits["x"], digits["y"])
    assert acc >= digits["acc"] - 0.01, (acc, digits["acc"])
