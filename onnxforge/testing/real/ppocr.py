"""Three held-out models for the trained-model suite: RapidOCR's PaddleOCR exports.

``rapidocr_onnxruntime==1.3.24`` ships the three models of a PaddleOCR pipeline as ``.onnx`` files
(``rapidocr_onnxruntime/models/``). No choice in ``quantize-int8`` or O3 was made looking at them:
they are the check that O3's speed and fidelity carry to trained models it was not developed on.
Pre- and post-processing follow the wheel's own code (``ch_ppocr_v3_det``, ``ch_ppocr_v3_rec``,
``ch_ppocr_v2_cls``; read, never imported), with Pillow instead of OpenCV (bilinear, as
``cv2.resize``'s default) and axis-aligned boxes instead of rotated rectangles (the pages here
are not rotated):

* ``pp-det`` — PP-OCRv4 text detector (DBNet): a document page with a short side of 736 pixels
  (``limit_type: min``, ``limit_side_len: 736``; 736×960 is already a multiple of 32), BGR,
  ``(x / 255 - mean) / std``; output a text probability map. Decoded like ``DBPostProcess``:
  threshold 0.3, 2×2 dilation, connected regions, mean probability ≥ 0.5, unclipped by
  ``area × 1.6 / perimeter``. Metric: F1 @ IoU 0.5 of the text boxes against the fp32 model's.
* ``pp-rec`` — PP-OCRv4 recognizer (SVTR-LCNet + CTC, 6,625 classes): one text line resized to
  height 48 (its width is ``48 × w / h``; our lines are drawn 320:48), ``x / 127.5 - 1``; decoded
  by CTC with the character list stored in the model's metadata (``character``), blank first and a
  space last, as ``CTCLabelDecode`` builds it. Metric: decoded-string agreement; truth: the text drawn.
* ``pp-cls`` — text-line direction classifier (MobileNetV3, labels ``0`` / ``180``): a text line
  upright or turned 180°, height 48, width ≤ 192, padded with zeros. Metric: top-1 agreement;
  truth: the turn applied.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from onnxforge.testing.real import images, metrics

WHEEL = "rapidocr_onnxruntime==1.3.24"
MEMBERS = {
    "pp-det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "pp-rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "pp-cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
DET_HW = (960, 736)  # a portrait page whose short side is limit_side_len, multiples of 32
REC_HW = (48, 320)  # rec_img_shape; the width follows the line's aspect, drawn 320:48 here
CLS_HW = (48, 192)  # cls_image_shape
DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
DET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# DBPostProcess settings of the wheel's config.yaml
DB_THRESH, DB_BOX_THRESH, DB_UNCLIP, DB_MIN_SIZE, DB_MAX_CANDIDATES = 0.3, 0.5, 1.6, 3, 1000


def _bgr_chw(img: Image.Image) -> np.ndarray:
    """OpenCV's channel order (the wheel reads images with ``cv2``), CHW, float32."""
    return np.asarray(img.convert("RGB"), np.float32)[:, :, ::-1].transpose(2, 0, 1)


# --------------------------------------------------------------------------- text lines


def line_text(rng: np.random.Generator) -> str:
    """2-4 pseudo-words, capitalised, sometimes with a number: what a text line crop says."""
    text = images.random_sentence(rng, int(rng.integers(2, 5)))
    if rng.random() < 0.3:
        text += f" {int(rng.integers(1, 10_000))}"
    return text


def _line(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[Image.Image, str]:
    """A dark text line on a light background at aspect ``hw`` (drawn 2-3× larger, as a crop from a
    scanned page would be), and its text."""
    text = line_text(rng)
    scale = rng.uniform(2.0, 3.0)
    w, h = int(hw[1] * scale), int(hw[0] * scale)
    img = Image.new("RGB", (w, h), images.random_color(rng, 215, 256))
    draw = ImageDraw.Draw(img)
    f = images.font(rng, int(h * rng.uniform(0.55, 0.75)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    while right - left > 0.95 * w and f.size > 8:  # shrink to fit the line
        f = images.font(rng, int(f.size * 0.9))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    x = int(rng.integers(0, max(1, w - (right - left)) // 4 + 1)) - left
    y = (h - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=images.random_color(rng, 0, 80), font=f)
    return img, text


def _resize_norm_line(img: Image.Image, hw: tuple[int, int]) -> np.ndarray:
    """``resize_norm_img`` of the recognizer and the classifier: height ``hw[0]``, width
    ``min(hw[1], ceil(h × aspect))``, ``x / 255 - 0.5) / 0.5``, zero padding on the right."""
    h, w_max = hw
    resized_w = min(w_max, int(math.ceil(h * img.width / img.height)))
    arr = _bgr_chw(img.resize((resized_w, h), Image.BILINEAR)) / 255.0
    out = np.zeros((3, h, w_max), np.float32)
    out[:, :, :resized_w] = (arr - 0.5) / 0.5
    return out[None]


def rec_sample(rng, photos, i) -> np.ndarray:
    img, _ = _line(rng, REC_HW)
    return _resize_norm_line(img, REC_HW)


def rec_text(rng) -> str:
    """The text ``rec_sample`` draws with ``rng`` (same draws)."""
    return _line(rng, REC_HW)[1]


def cls_sample(rng, photos, i) -> np.ndarray:
    """A text line, turned 180° for odd ``i`` (label 1, "180")."""
    img, _ = _line(rng, CLS_HW)
    if i % 2:
        img = img.rotate(180)
    return _resize_norm_line(img, CLS_HW)


def cls_label(i: int, split: str = "eval") -> int:
    """The class of ``cls_sample(i)``: 0 ("0") upright, 1 ("180") turned."""
    return i % 2


# --------------------------------------------------------------------------- the detector


def det_sample(rng, photos, i) -> np.ndarray:
    """A document page drawn at 736×960 (w×h: no resize), BGR, ``(x / 255 - mean) / std``."""
    page = images.document_page(rng, photos, (DET_HW[1], DET_HW[0]))
    arr = _bgr_chw(page).transpose(1, 2, 0) / 255.0
    return np.ascontiguousarray(((arr - DET_MEAN) / DET_STD).transpose(2, 0, 1)[None], dtype=np.float32)


def db_decode(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """``DBPostProcess`` with axis-aligned boxes: regions of ``prob > 0.3`` after a 2×2 dilation,
    each kept when its mean probability (over its box) is ≥ 0.5 and grown by
    ``d = area × unclip_ratio / perimeter`` on every side. Boxes (N, 4), x1 y1 x2 y2, input pixels."""
    from scipy import ndimage  # scikit-learn's dependency: the suite's (bench/test) extra

    prob = np.asarray(next(iter(outputs.values())), np.float32).reshape(DET_HW)
    bitmap = prob > DB_THRESH
    dilated = bitmap.copy()  # cv2.dilate with a 2×2 kernel (anchor at its centre: down/right)
    dilated[1:, :] |= bitmap[:-1, :]
    dilated[:, 1:] |= bitmap[:, :-1]
    dilated[1:, 1:] |= bitmap[:-1, :-1]
    labels, _ = ndimage.label(dilated, structure=np.ones((3, 3), bool))
    boxes = []
    for sl in ndimage.find_objects(labels)[:DB_MAX_CANDIDATES]:
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        w, h = x1 - x0, y1 - y0
        if min(w, h) < DB_MIN_SIZE or float(prob[sl].mean()) < DB_BOX_THRESH:
            continue
        d = w * h * DB_UNCLIP / (2.0 * (w + h))
        if min(w, h) + 2 * d < DB_MIN_SIZE + 2:
            continue
        boxes.append((max(0.0, x0 - d), max(0.0, y0 - d), min(DET_HW[1], x1 + d), min(DET_HW[0], y1 + d)))
    return np.asarray(boxes, np.float64).reshape(-1, 4)


# --------------------------------------------------------------------------- decoding


@functools.lru_cache(maxsize=2)
def rec_charset(model_path: str) -> tuple[str, ...]:
    """``CTCLabelDecode``'s list: "blank", the model's ``character`` metadata (one per line), " "."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    if "character" not in meta:
        raise LookupError(f"{model_path}: no 'character' metadata (the PP-OCR recognizer's charset)")
    return ("blank", *meta["character"].splitlines(), " ")


def make_rec_decode(charset: Sequence[str]):
    def decode(outputs: Mapping[str, np.ndarray]) -> str:
        probs = np.asarray(next(iter(outputs.values())))  # (1, T, classes)
        # stripped: a line's leading/trailing space is no reading difference
        return metrics.ctc_decode(probs.reshape(-1, probs.shape[-1]).argmax(-1), charset).strip()

    return decode
