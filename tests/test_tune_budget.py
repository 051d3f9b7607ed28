"""Mixed-precision int8 in ``tune``: a budgeted ``quantize-int8`` measures tune's own metric.

On the trained digits CNN (fixture ``trained_digits``): the pass records ``fallback.measure ==
"metric"`` on tune's search data, the candidate meets the budget as tune measures it, the budget
keeps nodes float where all-int8 breaks it, the unit mapping of the default space (half of tune's
``--max-drop``, in tune's unit), and the chosen model rebuilds from its config without the metric
(decision record). Latency is the size ratio here (deterministic): no timed assertions.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxforge.errors import OnnxforgeError
from onnxforge.tune.budget import BUDGET_CONFIDENCE, MIN_FEEDS, PassMetric, pass_budget, record_path, search_feeds
from onnxforge.tune.evaluate import EvalSettings, EvalSpec, Evaluator
from onnxforge.tune.space import Choice, default_space, space_from_dict

N_SEARCH = 180  # the first half of the digits test split is tune's search data


@pytest.fixture(scope="module")
def digits(trained_digits):
    from onnxforge.ir.io import model_to_bytes

    t = trained_digits
    name = t["name"]
    calib = {name: np.concatenate([f[name] for f in t["calib"]])}
    search = {name: t["x"][:N_SEARCH], "labels": t["y"][:N_SEARCH]}
    return {"bytes": model_to_bytes(t["model"]), "calib": calib, "search": search, "name": name}


@pytest.fixture(scope="module")
def all_int8(digits):
    """The all-int8 candidate scored by tune's cosine metric (drop = 1 - mean cosine to the original)."""
    return _evaluator(digits, "cosine", 1.0).evaluate("O1,quantize-int8")


def _evaluator(digits, metric: str, max_drop: float, decisions_dir=None, **settings) -> Evaluator:
    s = EvalSettings(metric=metric, max_drop=max_drop, latency="size", **settings)
    return Evaluator(EvalSpec(digits["bytes"], digits["search"], s, calibration=digits["calib"],
                              decisions_dir=None if decisions_dir is None else str(decisions_dir)))


def _fallback(result) -> dict:
    rec = next(r for r in result.report.records if r.name == "quantize-int8")
    return rec.stats["details"]["fallback"]


# ------------------------------------------------------------------------------- the unit mapping


def test_default_space_budget_is_tunes_whole_budget_at_90_percent_confidence():
    assert BUDGET_CONFIDENCE == 0.9
    assert pass_budget(1.0) == {"max_drop": 1.0, "budget_confidence": 0.9}
    space = default_space(max_drop=1.0)
    plain = next(s for s in space.slots if s.key == "quantize-int8")
    mixed = next(s for s in space.slots if s.key == "mixed-int8")
    assert mixed.name == "quantize-int8" and mixed.exclusive == plain.exclusive == "quantize"
    assert mixed.options["max_drop"] == 1.0 and mixed.options["budget_confidence"] == 0.9
    assert "max_drop" not in plain.options and "budget_confidence" not in plain.options
    assert mixed.options["weight_rounding"] == Choice(("nearest", "gptq")) and "latency_guard" not in mixed.options
    # no --max-drop, no budgeted candidates
    assert [s.key for s in default_space().slots if s.name == "quantize-int8"] == ["quantize-int8"]
    int8 = [p for p in (space.pipeline(c) for c in space.grid()) if "quantize-int8" in p]
    # all-int8 and mixed precision; the confidence only where there is a budget
    assert any("max_drop=1.0,budget_confidence=0.9" in p for p in int8) and any("max_drop" not in p for p in int8)
    assert not any("budget_confidence" in p and "max_drop" not in p for p in int8)


def test_space_file_none_is_the_passes_default():
    space = space_from_dict({"base": "O1", "space": [
        {"pass": "quantize-int8", "options": {"max_drop": ["none", 0.25]}}]})
    assert space.slots[0].options["max_drop"] == Choice((None, 0.25))
    tails = sorted(space.pipeline(p).rsplit(",", 1)[-1] for p in space.grid())
    assert tails == ["quantize-int8", "quantize-int8(max_drop=0.25)"]


def test_pass_metric_is_tunes_metric_on_the_samples_the_feeds_cover(digits):
    from onnxforge.passes.quantize.calibrate import run_outputs

    ev = _evaluator(digits, "top1", 1.0, eval_batch=64)  # 180 samples -> feeds of 64, 64, 52
    feeds, counts = search_feeds(ev)
    assert [counts[id(f)] for f in feeds] == [64, 64, 52]
    outs = run_outputs(ev.model_bytes, feeds, optimize=False)
    metric = PassMetric(ev, counts)
    assert metric(outs, feeds) == pytest.approx(ev.baseline())  # tune's top1 of the original, in points
    # a prefix of the feeds (the pass ranks on its first few) is scored on the samples it covers
    labels = digits["search"]["labels"][:128]
    pred = np.concatenate([o[0] for o in outs[:2]]).argmax(axis=1)
    assert metric(outs[:2], feeds[:2]) == pytest.approx(100.0 * np.mean(pred == labels))
    with pytest.raises(OnnxforgeError, match="not tune's search data"):
        metric(outs[:1], [dict(feeds[0])])
    # with where each feed starts, any feed alone is scored on its own samples (the drop's standard error)
    starts = {id(f): 64 * k for k, f in enumerate(feeds)}
    one = PassMetric(ev, counts, starts)([outs[1]], [feeds[1]])
    labels = digits["search"]["labels"][64:128]
    assert one == pytest.approx(100.0 * np.mean(outs[1][0].argmax(axis=1) == labels))
    # lower-is-better metrics change sign: the pass's "higher is better" drop is tune's drop
    ev_abs = _evaluator(digits, "max-abs", 0.1, eval_batch=64)
    feeds, counts = search_feeds(ev_abs)
    outs = run_outputs(ev_abs.model_bytes, feeds, optimize=False)
    moved = [[o + 0.25 for o in f] for f in outs]
    assert PassMetric(ev_abs, counts)(moved, feeds) == pytest.approx(-0.25, abs=1e-5)


# ------------------------------------------------------------------------------- the candidates


def test_budgeted_candidate_measures_tunes_top1_and_meets_the_budget(digits, tmp_path):
    ev = _evaluator(digits, "top1", 1.0, decisions_dir=tmp_path)
    pipeline = "O1,quantize-int8(max_drop=1.0,budget_confidence=0.9)"
    fb = _fallback(ev.build_result(pipeline))
    assert fb["measure"] == "metric"  # tune's metric, not the pass's proxy (expected flips)
    assert fb["samples"] == len(search_feeds(ev, MIN_FEEDS)[0]) == 20  # 180 samples in feeds of 9
    assert fb["budget"] == 1.0 and fb["drop_final"] <= 1.0 and fb.get("confidence") == 0.9, fb
    assert record_path(tmp_path, ev, pipeline).exists()
    cand = ev.evaluate(pipeline)
    assert cand.ok and cand.within(1.0), (cand.drop, fb)
    # without the budget the pass is not handed tune's metric
    plain = ev.build_result("O1,quantize-int8")
    rec = next(r for r in plain.report.records if r.name == "quantize-int8")
    assert "fallback" not in rec.stats["details"]


def test_budget_keeps_nodes_float_where_all_int8_breaks_it(digits, all_int8, tmp_path):
    budget = all_int8.drop / 4  # in tune's unit (1 - mean cosine to the original)
    ev = _evaluator(digits, "cosine", budget, decisions_dir=tmp_path)
    pipeline = f"O1,quantize-int8(max_drop={budget!r})"
    fb = _fallback(ev.build_result(pipeline))
    assert fb["measure"] == "metric"
    assert fb["drop_all_int8"] == pytest.approx(all_int8.drop, rel=0.05)
    assert fb["drop_all_int8"] > budget and fb["kept_float"] and fb["drop_final"] <= budget
    mixed = ev.evaluate(pipeline)
    assert mixed.ok and mixed.drop <= budget * 1.1, (mixed.drop, budget, fb["kept_float"])
    assert mixed.size_ratio > all_int8.size_ratio  # some weights stayed float


def test_tune_chooses_mixed_precision_and_its_config_replays_without_the_metric(digits, all_int8, tmp_path):
    from click.testing import CliRunner

    from onnxforge.cli import main
    from onnxforge.ir.io import load, save
    from onnxforge.tune.runner import tune

    budget = all_int8.drop / 4
    model = tmp_path / "digits.onnx"
    save(load(digits["bytes"]), model)
    np.savez(tmp_path / "calib.npz", **digits["calib"])
    space = space_from_dict({"base": "O1", "space": [
        {"pass": "quantize-int8", "options": {"max_drop": ["none", budget]}}]})
    settings = EvalSettings(metric="cosine", max_drop=budget, latency="size")
    out = tmp_path / "out" / "best.onnx"
    outcome = tune(model, eval_data=digits["search"], calibration_data=tmp_path / "calib.npz", space=space,
                   settings=settings, strategy="grid", budget=2, cache_dir=tmp_path / "cache", output=out)
    chosen = outcome.result.chosen
    assert chosen is not None and f"max_drop={budget!r}" in chosen.pipeline and chosen.drop <= budget * 1.1
    assert outcome.reproduced is True
    record = out.with_name("best.quantize-decisions.json")
    assert record.exists() and f'decisions = "{record.resolve()}"' in outcome.config.read_text()
    again = tmp_path / "again.onnx"
    r = CliRunner().invoke(main, ["optimize", str(model), "--config", str(outcome.config), "-o", str(again), "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == out.read_bytes()
