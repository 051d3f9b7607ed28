"""A detector's score-gated ``1 - cosine`` (quantize-int8's ``score_gate``; passes/quantize/detection.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.errors import PassOptionError
from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.quantize.calibrate import run_outputs
from onnxforge.passes.quantize.detection import detection_heads, gated_feed_drops, gated_fidelity_drop
from onnxforge.passes.quantize.fallback import GATED, fidelity_drop


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _yolox_rows(rng, anchors=400, classes=3, scored=20):
    """(1, A, 4 + 1 + C) rows like YOLOX's: box offsets, objectness and class probabilities, the
    first ``scored`` anchors on objects (objectness ~0.9), the rest background (~0.01)."""
    box = rng.normal(0.0, 1.0, (anchors, 4))
    obj_logit = np.full((anchors, 1), -4.6) + rng.normal(0.0, 0.3, (anchors, 1))
    obj_logit[:scored] = 2.2
    cls = _sigmoid(rng.normal(-5.0, 0.5, (anchors, classes)))
    return np.concatenate([box, _sigmoid(obj_logit), cls], axis=1)[None].astype(np.float32)


def test_detection_heads_reads_score_columns_from_the_outputs():
    """Probability columns near 0 on most anchors are scores; box offsets, distance logits, a
    one-class detector's high class probability and a classifier's (1, C) are not."""
    rng = np.random.default_rng(0)
    rows = _yolox_rows(rng)
    heads = detection_heads([[rows], [_yolox_rows(rng)]])
    assert heads is not None and heads[0].tolist() == [False] * 4 + [True] * 4

    # YOLOv8's (1, 4 + C, A): the anchors on axis 2
    heads = detection_heads([[np.swapaxes(rows, 1, 2)]])
    assert heads[0].tolist() == [False] * 4 + [True] * 4

    # a one-class detector's class probability is high everywhere: its objectness alone gates
    one = rows[:, :, :6].copy()
    one[..., 5] = 0.97
    assert detection_heads([[one]])[0].tolist() == [False] * 4 + [True, False]

    # PicoDet: per level a score output and a distance output with the same anchors
    scores = _sigmoid(rng.normal(-5.0, 1.0, (1, 300, 10))).astype(np.float32)
    dists = rng.normal(0.0, 2.0, (1, 300, 32)).astype(np.float32)
    heads = detection_heads([[scores, dists]])
    assert heads[0].all() and not heads[1].any()

    # not detectors: class scores, a softmax, a feature map
    logits = rng.normal(size=(1, 1000)).astype(np.float32)
    assert detection_heads([[logits]]) is None
    assert detection_heads([[np.exp(logits) / np.exp(logits).sum()]]) is None
    assert detection_heads([[rng.normal(size=(1, 8, 16, 16)).astype(np.float32)]]) is None
    # probabilities near 0 with no box columns beside them: a sigmoid mask, a dark image in [0, 1]
    # (a gate would skip their dark rows, whose error a regression's user sees)
    mask = _sigmoid(rng.normal(-5.0, 1.0, (1, 1, 64, 64))).astype(np.float32)
    assert detection_heads([[mask]]) is None
    # a text detector's probability map: dark background, but a few columns busy on most rows (a text
    # column down the page); every column stays in [0, 1], so there are no box columns: not a head
    page = _sigmoid(rng.normal(-5.0, 1.0, (1, 1, 96, 64)))
    page[..., 20:24] = _sigmoid(rng.normal(2.0, 1.0, (1, 1, 96, 4)))
    assert detection_heads([[page.astype(np.float32)]]) is None
    assert detection_heads([[scores]]) is None  # PicoDet's scores without their distances


def test_gated_drop_reads_the_anchors_that_score_not_the_background():
    """An error on the background anchors (kept below the gate) costs nothing however large, while
    ``1 - cosine`` of the whole output reads it; an error on the scored anchors is read in full; an
    anchor the int8 model lifts over the gate counts as a change."""
    rng = np.random.default_rng(1)
    ref = [[_yolox_rows(rng)] for _ in range(4)]
    heads = detection_heads(ref)

    background = []
    for (r,) in ref:
        o = r.copy()
        o[0, 20:, :4] += rng.normal(0.0, 1.0, o[0, 20:, :4].shape)  # boxes of background anchors
        o[0, 20:, 4] = np.minimum(o[0, 20:, 4] * 3.0, 0.15)  # their objectness, still below the gate
        background.append([o])
    assert fidelity_drop(ref, background) > 0.1
    assert gated_fidelity_drop(ref, background, heads, 0.2) == pytest.approx(0.0, abs=1e-12)

    on_objects = []
    for (r,) in ref:
        o = r.copy()
        o[0, :20, :4] += rng.normal(0.0, 0.3, o[0, :20, :4].shape)
        on_objects.append([o])
    gated = gated_fidelity_drop(ref, on_objects, heads, 0.2)
    assert gated > 2 * fidelity_drop(ref, on_objects) > 0

    # the 21st anchor crosses the gate in int8 only: measured on the first feed, not the others
    lifted = [[r.copy()] for (r,) in ref]
    lifted[0][0][0, 20, 4] = 0.6
    drops = gated_feed_drops(ref, lifted, heads, 0.2)
    assert drops[0] > 1e-3 and np.all(np.abs(drops[1:]) < 1e-12)


def test_gated_drop_pairs_score_and_distance_outputs_by_anchor_count():
    """PicoDet's distance output is measured on the anchors its score output gates; an output of
    another anchor count with no score column keeps the plain ``1 - cosine`` (see fallback)."""
    rng = np.random.default_rng(2)
    scores = _sigmoid(rng.normal(-5.0, 0.5, (1, 300, 4)))
    scores[0, :10, 0] = 0.8
    dists = rng.normal(0.0, 2.0, (1, 300, 32))
    ref = [[scores.astype(np.float32), dists.astype(np.float32)]]
    heads = detection_heads(ref)
    out = dists.copy()
    out[0, 10:] += 5.0  # the background's distances, far off
    assert gated_fidelity_drop(ref, [[ref[0][0], out.astype(np.float32)]], heads, 0.2) == pytest.approx(0.0, abs=1e-12)
    out = dists.copy()
    out[0, :10] *= -1.0  # the scored anchors' distances, reversed
    assert gated_fidelity_drop(ref, [[ref[0][0], out.astype(np.float32)]], heads, 0.2) > 1.0


@pytest.fixture(scope="module")
def tiny_detector():
    """A YOLOX-shaped detector exported from torch: two strided convs, a box head and sigmoid
    objectness and class heads, ``(1, 4 + 1 + 2, 8, 8)`` reshaped to ``(1, 64, 7)`` anchor rows.
    Its objectness is set so that about one anchor in ten scores above 0.3 on the calibration
    images (light squares on a dark ground), the rest near 0 like a trained detector's background."""
    import torch

    from onnxforge.testing import zoo

    torch.manual_seed(0)

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 16, 3, 2, 1)
            self.c2 = torch.nn.Conv2d(16, 32, 3, 2, 1)
            self.c3 = torch.nn.Conv2d(32, 32, 3, 1, 1)
            self.box = torch.nn.Conv2d(32, 4, 1)
            self.obj = torch.nn.Conv2d(32, 1, 1)
            self.cls = torch.nn.Conv2d(32, 2, 1)

        def features(self, x):
            return torch.nn.functional.silu(self.c3(torch.nn.functional.silu(self.c2(
                torch.nn.functional.silu(self.c1(x))))))

        def forward(self, x):
            f = self.features(x)
            y = torch.cat([self.box(f), torch.sigmoid(self.obj(f)), torch.sigmoid(self.cls(f))], 1)
            return y.flatten(2).transpose(1, 2)

    rng = np.random.default_rng(0)

    def image():
        x = rng.uniform(0.0, 0.2, (1, 3, 32, 32)).astype(np.float32)
        for _ in range(2):
            r, c = rng.integers(0, 24, 2)
            x[:, :, r:r + 8, c:c + 8] = rng.uniform(0.7, 1.0)
        return x

    det = Detector().eval()
    images = [image() for _ in range(16)]
    with torch.no_grad():
        logits = torch.cat([det.obj(det.features(torch.from_numpy(x))).flatten() for x in images]).numpy()
        q50, q90 = np.quantile(logits, [0.5, 0.9])
        # logit' = scale * (logit - b) + b': the median 4 logits below the 90th percentile, which scores 0.3
        scale, b = 4.0 / max(q90 - q50, 1e-6), det.obj.bias.item()
        det.obj.weight *= scale
        det.obj.bias.fill_(float(np.log(0.3 / 0.7) - scale * (q90 - b)))
        det.cls.bias -= 6.0
        det.box.bias += 0.5  # box offsets around the cell's centre, not near 0 like a background score,
        det.box.bias[0] -= 1.0  # and a signed one (x offset) that leaves [0, 1], as box regressions do
    model = zoo.export_model(det, (torch.from_numpy(images[0]),))
    name = model.graph.inputs[0].name
    return model, [{name: x} for x in images]


def _q(model, calib, **opts):
    model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    return create_pass("quantize-int8", opts, PassContext(calibration_data=calib))(model)


def test_quantize_int8_budgets_a_detector_where_its_anchors_score(tiny_detector):
    """With ``score_gate`` the budget's measure is the gated ``1 - cosine``: the report names it and the
    score columns it read, and the model it keeps holds the budget measured independently. On this
    detector int8 errs more on the anchors that score than on its background: the plain measure
    passes the all-int8 model that the gated one does not."""
    model, calib = tiny_detector
    ref = run_outputs(model, calib, optimize=False)
    heads = detection_heads(ref)
    assert heads is not None and heads[0].tolist() == [False] * 4 + [True] * 3, heads
    scored = np.mean([np.mean(r[0][0, :, 4] >= 0.3) for r in ref])
    assert 0.02 < scored < 0.3, scored  # the fixture's premise: a few anchors score

    budget = 1e-4
    r = _q(model, calib, calibration="sqnr", max_drop=0.01, max_cosine_drop=budget, score_gate=0.2)
    fb = r.stats.details["fallback"]
    assert fb["measure"] == GATED and fb["score_gate"] == 0.2 and fb["budget"] == budget, fb
    assert list(fb["score_columns"].values()) == [3], fb
    assert fb["drop_all_int8"] > budget and fb["kept_float"], fb
    out = run_outputs(r.model, calib)
    assert gated_fidelity_drop(ref, out, heads, 0.2) <= budget  # measured independently
    assert fb["drop_final"] == pytest.approx(gated_fidelity_drop(ref, out, heads, 0.2), rel=1e-6)

    plain = _q(model, calib, calibration="sqnr", max_drop=0.01, max_cosine_drop=budget).stats.details["fallback"]
    assert plain["measure"] == "1 - cosine" and "score_gate" not in plain
    assert plain["drop_all_int8"] <= budget and not plain.get("kept_float"), plain


def test_score_gate_decisions_replay_byte_identical(tiny_detector, tmp_path):
    """A build with ``score_gate`` writes its decisions; the rebuild replays them to the same bytes,
    and a record made without the gate is refused (the gate changes what the budget measures)."""
    model, calib = tiny_detector
    path = str(tmp_path / "det.decisions.json")
    opts = dict(calibration="sqnr", max_drop=0.01, max_cosine_drop=1e-4, score_gate=0.2, decisions=path)
    a, b = _q(model, calib, **opts), _q(model, calib, **opts)
    assert b.stats.details["decisions"]["source"].startswith("record")
    ser = lambda m: ir.serde.serialize_model(m).SerializeToString()  # noqa: E731
    assert ser(a.model) == ser(b.model)
    with pytest.raises(PassOptionError, match="score_gate"):
        _q(model, calib, **{**opts, "score_gate": None})


def test_score_gate_is_checked():
    with pytest.raises(PassOptionError, match="score_gate"):
        create_pass("quantize-int8", {"score_gate": 1.5}, PassContext())
