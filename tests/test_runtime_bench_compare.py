"""bench / bench_interleaved give sane numbers; compare on hand-computed arrays; compare_models."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.errors import CalibrationDataError
from onnxforge.runtime.bench import BenchResult, bench, bench_interleaved, ratios
from onnxforge.runtime.compare import (
    OutputMismatchError,
    abs_diff,
    class_axis,
    compare,
    compare_models,
    pair_outputs,
    sample_cosines,
    tolerance_violation,
    within_tolerance,
)
from onnxforge.runtime.session import make_session


def classifier(weight: np.ndarray, batch: str | int = "batch") -> onnx.ModelProto:
    """logits = x @ W, x: float32 [batch, 4], W: [4, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"])], "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5


# --- bench ----------------------------------------------------------------------------------------

def _sane(r: BenchResult, batch: int, n_min: int) -> None:
    assert r.n >= n_min and len(r.times_ms) == r.n
    assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms
    assert r.mean_ms > 0
    assert r.batch_size == batch
    assert r.throughput_per_s == pytest.approx(batch / (r.p50_ms / 1e3))
    assert r.providers_used == ["CPUExecutionProvider"]


def test_bench_synthesizes_feeds_with_batch_size():
    r = bench(classifier(W), batch_size=8, warmup=2, repeat=20, threads=1)
    _sane(r, 8, 20)
    assert set(r.to_dict()) >= {"p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "providers_used"}
    assert "times_ms" not in r.to_dict()


def test_bench_with_feeds_and_min_time():
    feeds = {"x": np.ones((3, 4), np.float32)}
    r = bench(classifier(W), feeds, warmup=0, repeat=5, min_time_s=0.05)
    _sane(r, 3, 5)
    # kept running past `repeat` for about min_time_s: the timed calls cover most of it, but on a tiny
    # model the loop's own overhead between calls is a sizeable share (39.6 ms of 50 ms seen), so
    # only a loose bound on their sum
    assert r.n > 5 and sum(r.times_ms) >= 20


def test_bench_fixed_batch_refuses_other_batch_size():
    with pytest.raises(CalibrationDataError, match="fixed batch axis of 1"):
        bench(classifier(W, batch=1), batch_size=4, repeat=1)


def test_bench_with_io_binding_runs_through_the_binding(monkeypatch):
    """With io_binding the timed call is run_with_iobinding (inputs placed once), not session.run."""
    info = make_session(classifier(W), optimize="all")
    calls = {"run": 0, "bound": 0}
    real_run, real_bound = info.session.run, info.session.run_with_iobinding

    def counting_run(*a, **k):
        calls["run"] += 1
        return real_run(*a, **k)

    def counting_bound(*a, **k):
        calls["bound"] += 1
        return real_bound(*a, **k)

    monkeypatch.setattr(info.session, "run", counting_run, raising=False)
    monkeypatch.setattr(info.session, "run_with_iobinding", counting_bound, raising=False)
    r = bench(info, {"x": np.ones((2, 4), np.float32)}, warmup=1, repeat=4, io_binding=True)
    assert r.n == 4 and calls == {"run": 0, "bound": 5}
    bench(info, {"x": np.ones((2, 4), np.float32)}, warmup=1, repeat=4, io_binding=False)
    assert calls["run"] == 5


def test_bench_interleaved_runs_every_model_equally():
    models = {
        "disabled": make_session(classifier(W), optimize="disable"),
        "all": classifier(W),
        "other": classifier(W * 2),
    }
    results = bench_interleaved(models, rounds=4, per_round=3, warmup=1, batch_size=2)
    assert list(results) == ["disabled", "all", "other"]
    for r in results.values():
        _sane(r, 2, 12)
        assert r.n == 12
    rel = ratios(results, "disabled")
    assert rel["disabled"] == 1.0 and all(v > 0 for v in rel.values())


# --- compare --------------------------------------------------------------------------------------

REF = {"logits": np.array([[1.0, 2.0, 3.0], [3.0, 0.0, 1.0]], np.float32), "count": np.array([5], np.int64)}
CAND = {"logits": np.array([[1.0, 2.0, 2.5], [0.0, 4.0, 1.0]], np.float32), "count": np.array([7], np.int64)}
# |diff| = [[0, 0, .5], [3, 4, 0]]: max 4, max|ref| 3, mean 7.5/6; <r,c> = 13.5, |r|^2 = 24, |c|^2 = 28.25;
# argmax ref [2, 0], cand [2, 1]
COSINE = 13.5 / math.sqrt(24 * 28.25)


def test_compare_hand_computed():
    r = compare(REF, CAND)
    logits, count = r.per_output
    assert logits.name == "logits" and logits.shape == (2, 3)
    assert logits.max_abs == pytest.approx(4.0)
    assert logits.max_rel == pytest.approx(4.0 / 3.0)
    assert logits.mean_abs == pytest.approx(1.25)
    assert logits.cosine == pytest.approx(COSINE)
    assert logits.top1_agreement == pytest.approx(0.5)
    assert count.max_abs == 2.0 and count.max_rel == pytest.approx(0.4)
    assert count.cosine == pytest.approx(1.0) and count.top1_agreement is None  # integer output
    assert r.max_abs == pytest.approx(4.0) and r.max_rel == pytest.approx(4.0 / 3.0)
    assert r.cosine == pytest.approx(COSINE)  # min over outputs
    assert r.top1_agreement == pytest.approx(0.5)


def test_compare_many_samples_accumulates_like_one():
    refs = [{"logits": REF["logits"][i : i + 1]} for i in range(2)]
    cands = [{"logits": CAND["logits"][i : i + 1]} for i in range(2)]
    r = compare(refs, cands, labels=[2, 1], metric=lambda ref, cand: float(np.abs(ref["logits"] - cand["logits"]).sum()))
    assert r.n_samples == 2
    assert r.max_abs == pytest.approx(4.0) and r.cosine == pytest.approx(COSINE)
    assert r.top1_agreement == pytest.approx(0.5)
    assert r.reference_accuracy == pytest.approx(0.5) and r.candidate_accuracy == pytest.approx(1.0)
    assert r.metric == pytest.approx(7.5)


def test_compare_edge_cases():
    zeros = {"y": np.zeros((2, 2), np.float32)}
    same = compare(zeros, zeros)
    assert same.max_abs == 0 and same.max_rel == 0 and same.cosine == 1.0
    off = compare(zeros, {"y": np.ones((2, 2), np.float32)})
    assert off.max_rel == math.inf and off.cosine == 0.0
    # unnamed outputs (lists of arrays) are matched by position
    assert compare([REF["logits"]], {"renamed": CAND["logits"]}).max_abs == pytest.approx(4.0)
    with pytest.raises(OutputMismatchError, match="shape changed"):
        compare({"y": np.zeros(3)}, {"y": np.zeros(4)})
    with pytest.raises(ValueError, match="class axis"):
        compare({"y": np.zeros(3)}, {"y": np.zeros(3)}, labels=[0, 1, 2])


def test_class_axis():
    assert class_axis((8, 10)) == 1
    assert class_axis((2, 16, 30522)) == 2
    assert class_axis((2, 21, 64, 64)) == 1
    assert class_axis((8,)) is None and class_axis((8, 1)) is None


def test_compare_models_runs_both_on_the_same_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    data = [{"x": x[i : i + 2]} for i in range(0, 6, 2)]
    same = compare_models(classifier(W), classifier(W), data)
    assert same.max_abs == 0 and same.cosine == pytest.approx(1.0) and same.top1_agreement == 1.0
    assert same.providers_used == {"reference": ["CPUExecutionProvider"], "candidate": ["CPUExecutionProvider"]}
    W2 = W + 0.01
    diff = compare_models(classifier(W), classifier(W2), data, labels=np.argmax(x @ W, axis=1))
    expected = np.abs(x.astype(np.float64) @ W - x.astype(np.float64) @ W2).max()
    assert diff.max_abs == pytest.approx(expected, rel=1e-4)
    assert diff.reference_accuracy == 1.0
    assert diff.n_samples == 3


# --- one comparator, by name (issue 13) ------------------------------------------------------------

def test_named_outputs_pair_by_name_never_by_position():
    """Regression: renamed / dropped outputs were paired by position and compared as if equal."""
    with pytest.raises(OutputMismatchError, match="'logits' missing.*extra candidate output.*'renamed'") as e:
        compare(REF, {"renamed": REF["logits"], "count": REF["count"]})
    assert e.value.missing == ["logits"] and e.value.extra == ["renamed"]
    with pytest.raises(OutputMismatchError, match="'count' missing"):
        compare(REF, {"logits": REF["logits"]})
    with pytest.raises(OutputMismatchError, match="extra candidate output"):
        compare({"logits": REF["logits"]}, REF)
    # same names in another order: paired by name
    swapped = compare(REF, {"count": CAND["count"], "logits": CAND["logits"]})
    assert [o.name for o in swapped.per_output] == ["logits", "count"] and swapped.max_abs == pytest.approx(4.0)
    # explicit positional pairing is still available (e.g. two exports with different names)
    assert compare(REF, {"a": CAND["logits"], "b": CAND["count"]}, by_position=True).max_abs == pytest.approx(4.0)
    assert pair_outputs(["a", "b"], ["b", "a"]) == [("a", "a"), ("b", "b")]


def test_within_tolerance_is_defined_everywhere():
    """Regression: ``diff <= atol + rtol * scale`` with rtol = inf and scale = 0 is NaN (false)."""
    assert within_tolerance(0.0, 0.0, math.inf, 1e-5)  # a correct result on an all-zero output
    assert within_tolerance(5.0, 0.0, math.inf, 1e-5)  # inf: anything goes
    assert within_tolerance(1e-5, 0.0, 1e-4, 1e-5) and not within_tolerance(2e-5, 0.0, 1e-4, 1e-5)
    assert within_tolerance(1e-3, 10.0, 1e-4, 1e-5) and not within_tolerance(1.1e-3, 10.0, 1e-4, 0.0)
    assert not within_tolerance(math.nan, 1.0, 1e-4, 1e-5)
    assert not within_tolerance(math.inf, 1.0, 1e-4, 1e-5)


def test_non_finite_values_compare_without_nan():
    ref = np.array([np.nan, np.inf, -np.inf, 1.0, 2.0], np.float32)
    same = compare({"y": ref}, {"y": ref.copy()})
    assert same.max_abs == 0.0 and same.per_output[0].scale == 2.0
    assert same.cosine == pytest.approx(1.0)
    np.testing.assert_array_equal(abs_diff(ref, np.array([1.0, np.inf, np.inf, np.nan, 2.5])),
                                  [np.inf, 0.0, np.inf, np.inf, 0.5])
    worse = compare({"y": ref}, {"y": np.where(np.isnan(ref), 0.0, ref)})
    assert worse.max_abs == math.inf and not within_tolerance(worse.max_abs, 2.0, 1e-4, 1e-5)


def test_sample_cosines_pair_by_name():
    ref = {"a": np.array([[1.0, 0.0], [0.0, 0.0]]), "b": np.array([[0.0], [0.0]])}
    cand = {"b": np.array([[1.0], [0.0]]), "a": np.array([[1.0, 0.0], [0.0, 0.0]])}
    np.testing.assert_allclose(sample_cosines(ref, cand), [1 / math.sqrt(2), 1.0])
    with pytest.raises(OutputMismatchError, match="'b' missing"):
        sample_cosines(ref, {"a": ref["a"]})


def test_tolerance_violation_names_the_first_output_out_of_bounds():
    ok = compare({"a": np.zeros(3), "b": np.ones(3)}, {"a": np.zeros(3), "b": np.ones(3) + 5e-5})
    assert tolerance_violation(ok, 1e-4, 1e-5) == ""
    bad = compare({"a": np.zeros(3), "b": np.ones(3)}, {"a": np.zeros(3), "b": np.ones(3) + 1e-3})
    assert tolerance_violation(bad, 1e-4, 1e-5).startswith("output 'b' max abs diff 0.001 > 1e-05 + 0.0001 × 1")
    assert tolerance_violation(bad, math.inf, 0.0) == ""
