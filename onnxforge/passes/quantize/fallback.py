"""Accuracy-aware fallback (``max_drop``) for ``quantize-int8``.

It works on node subsets: :class:`~.qdq.QuantContext` builds a quantized copy of the float
model for any set of chosen nodes, so each decision is measured, not guessed.

Accuracy fallback (``max_drop``): the drop of a model is ``1 - mean cosine(float, int8)`` over the
evaluation feeds (worst output, :func:`fidelity_drop`), or ``metric(float) - metric(int8)`` when the context has
``options['metric']`` (``metric(outputs_per_feed, feeds) -> float``, higher is better) and
``options['eval_data']``. Sensitivity of a weighted node = the drop with only that node quantized.
Nodes are kept float in decreasing order of sensitivity; the smallest prefix that meets the budget is
found by bisection (drop is near-monotone in the number of float nodes), with a final check.

The latency guard (per int8 region, with a confidence interval) is in :mod:`.guard`.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxforge.passes.base import PassStats, Skip
from onnxforge.passes.quantize import calibrate as cal
from onnxforge.passes.quantize.qmath import cosine

logger = logging.getLogger(__name__)

_EVAL_FEEDS = 8  # sensitivity runs one model per weighted node: keep O3's build time bounded


def _eval_feeds(pass_, qc) -> list[dict[str, np.ndarray]]:
    data = pass_.context.options.get("eval_data")
    if data is not None:
        return cal.iter_feeds(data, None)
    return qc.feeds[:_EVAL_FEEDS]


def fidelity_drop(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    """The default proxy of a task metric's drop: the worst output's ``1 - mean cosine`` over the feeds.

    (Top-1 flips of class scores were tried as a second measure: on the 8-32 calibration samples a
    budget sees, one flip is 3-12 points, so the fallback chased noise - EfficientNet-Lite0 kept 6
    convs float and 0.77x latency for the same held-out agreement as all-int8.)"""
    worst = 0.0
    for k in range(len(ref[0]) if ref else 0):
        worst = max(worst, 1.0 - float(np.mean([cosine(r[k], o[k]) for r, o in zip(ref, outs)])))
    return worst


class _Scorer:
    def __init__(self, pass_, qc):
        self.qc = qc
        self.feeds = _eval_feeds(pass_, qc)
        self.metric = pass_.context.options.get("metric")
        self.ref = cal.run_outputs(qc.float_bytes, self.feeds, optimize=False)
        self.ref_metric = self.metric(self.ref, self.feeds) if self.metric else None
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
                else:
                    self.cache[key] = fidelity_drop(self.ref, outs)
        return self.cache[key]


def accuracy_fallback(pass_, qc, chosen: set[int], stats: PassStats) -> set[int]:
    from onnxforge.passes.quantize.qdq import select

    budget = float(pass_.max_drop)
    scorer = _Scorer(pass_, qc)
    infos = qc.analysis.infos
    full = scorer.drop(chosen)
    stats.details["fallback"] = {"budget": budget, "drop_all_int8": full,
                                 "measure": "metric" if scorer.metric else "1 - cosine"}
    if full <= budget:
        stats.details["fallback"]["drop_final"] = full
        stats.note(f"max_drop: all-int8 drop {full:.4g} within budget {budget:g}")
        return chosen
    weighted = sorted(i for i in chosen if infos[i].role == "weighted")
    sens = {i: scorer.drop({i}) for i in weighted}
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
