"""Accuracy-aware fallback and latency guard for ``quantize-int8``.

Both work on node subsets: :class:`~.qdq.QuantContext` builds a quantized copy of the float
model for any set of chosen nodes, so each decision is measured, not guessed.

Accuracy fallback (``max_drop``): the drop of a model is ``1 - mean cosine(float, int8)`` over the
evaluation feeds (worst output), or ``metric(float) - metric(int8)`` when the context has
``options['metric']`` (``metric(outputs_per_feed, feeds) -> float``, higher is better) and
``options['eval_data']``. Sensitivity of a weighted node = the drop with only that node quantized.
Nodes are kept float in decreasing order of sensitivity; the smallest prefix that meets the budget is
found by bisection (drop is near-monotone in the number of float nodes), with a final check.

Latency guard: for each quantized op type, the int8 model is timed (onnxruntime, all graph
optimizations, interleaved runs) against the same model with that op type left float; int8 stays only
where it is faster. Finally the whole int8 model is timed against fp32, and if it is not faster by
``MIN_GAIN`` the model stays float (thin models lose to the Q/DQ overhead).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from onnxforge.passes.base import PassStats, Skip
from onnxforge.passes.quantize import calibrate as cal
from onnxforge.passes.quantize.qmath import cosine

logger = logging.getLogger(__name__)

MIN_GAIN = 0.97  # int8 must run in <= 97% of the float time to be kept (noise margin)
_EVAL_FEEDS = 16


def _eval_feeds(pass_, qc) -> list[dict[str, np.ndarray]]:
    data = pass_.context.options.get("eval_data")
    if data is not None:
        return cal.iter_feeds(data, None)
    return qc.feeds[:_EVAL_FEEDS]


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
                    cos = [min(cosine(r, o) for r, o in zip(rs, os_)) for rs, os_ in zip(self.ref, outs)]
                    self.cache[key] = float(1.0 - np.mean(cos))
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


def _latency(models: dict[str, Any], feeds: dict[str, np.ndarray], threads: int | None) -> dict[str, float]:
    from onnxforge.runtime.bench import bench_interleaved

    res = bench_interleaved(models, feeds, rounds=10, per_round=5, warmup=3, threads=threads, optimize="all")
    return {k: v.p50_ms for k, v in res.items()}


def latency_guard(pass_, qc, chosen: set[int], stats: PassStats) -> set[int]:
    from onnxforge.passes.quantize.qdq import select

    if not chosen:
        return chosen
    infos = qc.analysis.infos
    feeds = qc.feeds[0]
    model = qc.fresh()
    report: dict[str, Any] = {}
    # weighted ops first (they carry the gain), then the int8 ops around them (Add, Mul, ...)
    ops = sorted({infos[i].op_type for i in chosen if infos[i].role != "share"},
                 key=lambda op: (op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"), op))
    for op in ops:
        forced = {i for i in chosen if infos[i].op_type == op}
        if not forced:
            continue
        without = select(model, qc.analysis, forced, target=qc.target) & chosen
        t = _latency({"int8": qc.build(chosen), "without": qc.build(without) if without else qc.float_bytes},
                     feeds, None)
        ratio = t["int8"] / t["without"]
        report[op] = {"int8_ms": t["int8"], f"{op}_float_ms": t["without"], "ratio": ratio}
        if ratio > 1.0:
            for i in forced:
                stats.skipped.append(Skip(infos[i].name, op, f"latency guard: int8 {op} measured slower "
                                          f"({t['int8']:.3g} ms vs {t['without']:.3g} ms with {op} float)"))
            chosen = without
            stats.count("latency_reverted", len(forced))
        if not chosen:
            break
    if chosen:
        t = _latency({"int8": qc.build(chosen), "fp32": qc.float_bytes}, feeds, None)
        ratio = t["int8"] / t["fp32"]
        report["model"] = {"int8_ms": t["int8"], "fp32_ms": t["fp32"], "ratio": ratio}
        if ratio > MIN_GAIN:
            stats.note(f"latency guard: the int8 model is not faster than fp32 ({t['int8']:.3g} ms vs "
                       f"{t['fp32']:.3g} ms, ratio {ratio:.2f} > {MIN_GAIN}): keeping the model float")
            for i in chosen:
                stats.skipped.append(Skip(infos[i].name, infos[i].op_type,
                                          "latency guard: the int8 model as a whole is not faster than fp32"))
            chosen = set()
    stats.details["latency_guard"] = report
    return chosen
