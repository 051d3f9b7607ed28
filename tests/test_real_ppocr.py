"""The suite's held-out PaddleOCR models (onnxforge.testing.real.ppocr): inputs as RapidOCR makes
them, the DB detector's box decoding, the recognizer's CTC charset, the labels — all offline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from onnxforge.testing.real import cases, images, metrics, ppocr


@pytest.fixture(scope="module")
def photos():
    return images.sklearn_photos()


@pytest.mark.parametrize("name, sample, lo, hi", [
    ("pp-det", ppocr.det_sample, -2.2, 2.7),
    ("pp-rec", ppocr.rec_sample, -1.0, 1.0),
    ("pp-cls", ppocr.cls_sample, -1.0, 1.0),
])
def test_sample_shapes_ranges_determinism(name, sample, lo, hi, photos):
    a = sample(np.random.default_rng([7, 1]), photos, 1)
    b = sample(np.random.default_rng([7, 1]), photos, 1)
    c = sample(np.random.default_rng([7, 2]), photos, 2)
    assert a.shape == cases.SUITE[name].input_shape and a.dtype == np.float32
    assert lo - 1e-3 <= a.min() and a.max() <= hi + 1e-3 and a.std() > 0.01
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_text_lines_keep_their_aspect_and_pad_with_zeros():
    # a line drawn 320:48 fills the recognizer's width; the classifier's 192 is its cap (RapidOCR's
    # resize_norm_img: min(width, ceil(48 * aspect)), zeros to the right of a narrower line)
    rec = ppocr.rec_sample(np.random.default_rng(0), [], 0)
    assert np.abs(rec[0, :, :, -4:]).max() > 0
    narrow = ppocr._resize_norm_line(Image.new("RGB", (96, 48), (255, 255, 255)), ppocr.CLS_HW)
    assert np.all(narrow[0, :, :, :96] == 1.0) and np.all(narrow[0, :, :, 96:] == 0.0)


def test_cls_turns_odd_samples_and_labels_them():
    rng = lambda: np.random.default_rng([3, 5])  # noqa: E731
    line, _ = ppocr._line(rng(), ppocr.CLS_HW)
    upright, turned = ppocr.cls_sample(rng(), [], 0), ppocr.cls_sample(rng(), [], 1)
    np.testing.assert_array_equal(upright, ppocr._resize_norm_line(line, ppocr.CLS_HW))
    np.testing.assert_array_equal(turned, ppocr._resize_norm_line(line.rotate(180), ppocr.CLS_HW))
    assert not np.array_equal(turned, upright)
    assert [ppocr.cls_label(i) for i in range(4)] == [0, 1, 0, 1]


def test_rec_labels_are_the_texts_drawn():
    seed = [11, 1, 4]
    text = ppocr.rec_text(np.random.default_rng(seed))
    img, drawn = ppocr._line(np.random.default_rng(seed), ppocr.REC_HW)
    assert text == drawn and 2 <= len(text.split()) <= 5
    assert img.width * ppocr.REC_HW[0] == pytest.approx(img.height * ppocr.REC_HW[1], rel=0.02)


def _prob_map(boxes, value=0.9):
    prob = np.zeros((1, 1, *ppocr.DET_HW), np.float32)
    for x1, y1, x2, y2 in boxes:
        prob[0, 0, y1:y2, x1:x2] = value
    return {"sigmoid_0.tmp_0": prob}


def test_db_decode_finds_each_region_and_unclips_it():
    out = ppocr.db_decode(_prob_map([(100, 50, 300, 70), (100, 200, 140, 230)]))
    assert out.shape == (2, 4)
    out = out[np.argsort(out[:, 1])]
    # region 200x20 after the 2x2 dilation: 201x21; d = area * 1.6 / perimeter
    w, h = 201, 21
    d = w * h * 1.6 / (2 * (w + h))
    np.testing.assert_allclose(out[0], [100 - d, 50 - d, 301 + d, 71 + d], atol=1e-6)
    assert metrics.detection_f1([out], [out]) == 1.0


def test_db_decode_drops_weak_and_tiny_regions():
    weak = ppocr.db_decode(_prob_map([(10, 10, 200, 40)], value=0.4))  # above 0.3, mean below 0.5
    tiny = ppocr.db_decode(_prob_map([(10, 10, 11, 11)]))  # 2x2 after dilation: under min_size 3
    assert weak.shape == (0, 4) and tiny.shape == (0, 4)


def test_rec_charset_is_blank_metadata_space_and_decode_collapses(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    helper.set_model_props(model, {"character": "a\nb\nc"})
    path = tmp_path / "rec.onnx"
    onnx.save(model, str(path))
    charset = ppocr.rec_charset(str(path))
    assert charset == ("blank", "a", "b", "c", " ")
    probs = np.zeros((1, 6, 5), np.float32)
    for t, k in enumerate([4, 1, 1, 0, 1, 2]):  # " a a - a b": space, repeat collapsed, blank splits
        probs[0, t, k] = 1.0
    assert ppocr.make_rec_decode(charset)({"y": probs}) == "aab"  # leading space stripped


def test_rec_charset_without_metadata_is_a_clear_error(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    path = tmp_path / "plain.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LookupError, match="character"):
        ppocr.rec_charset(str(path))
