"""Latency and throughput: warm-up, repetitions, percentiles; interleaved runs for fair ratios.

A single ``bench`` measures one model. Comparing models one after the other lets machine noise (a
neighbour's process, frequency scaling, a warm cache) land on one of them only; ``bench_interleaved``
alternates the models inside every round (rotating which goes first) so that noise hits all of
them alike. Every benchmark that reports a ratio uses it.

Throughput is samples per second: ``batch / latency``, where ``batch`` is ``batch_size`` or the
leading dimension of the first input.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxforge.runtime._model import ModelLike, check_feeds, session_input_specs
from onnxforge.runtime.data import feed_shapes, random_feeds
from onnxforge.runtime.session import SessionInfo, make_session


@dataclass
class BenchResult:
    """Latency percentiles in milliseconds over ``n`` timed runs, and throughput in samples/s."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_per_s: float
    batch_size: int
    n: int
    providers_used: list[str]
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_times(
        cls, times_s: Sequence[float], batch_size: int, info: SessionInfo
    ) -> BenchResult:
        ms = np.asarray(times_s, dtype=np.float64) * 1e3
        if ms.size == 0:
            raise ValueError("no timed runs")
        p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
        return cls(
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=p99,
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
            throughput_per_s=batch_size / (p50 / 1e3) if p50 > 0 else float("inf"),
            batch_size=batch_size,
            n=int(ms.size),
            providers_used=list(info.providers_used),
            fallbacks=list(info.fallbacks),
            times_ms=[float(x) for x in ms],
        )

    def to_dict(self, with_times: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_times:
            d.pop("times_ms")
        d["fallbacks"] = [list(f) for f in self.fallbacks]
        return d


def _session(
    model: ModelLike | SessionInfo,
    providers: Sequence[str],
    threads: int | None,
    optimize: str | bool,
    provider_options: Any,
) -> SessionInfo:
    if isinstance(model, SessionInfo):
        return model
    return make_session(model, providers, threads=threads, optimize=optimize, provider_options=provider_options)


def _runner(info: SessionInfo, feeds: Mapping[str, Any], io_binding: bool | None, provider_options: Any):
    # Imported here: tune builds on this module.
    from onnxforge.runtime.tune import make_runner

    return make_runner(info, feeds, io_binding=io_binding, provider_options=provider_options)


def bench_feeds(
    info: SessionInfo,
    feeds: Mapping[str, Any] | None,
    batch_size: int | None,
    dim_values: Mapping[str, int] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], int]:
    """Validated feeds for ``info`` (random ones from the input shapes when ``feeds`` is None), and
    the batch size used for throughput."""
    specs = session_input_specs(info.session)
    if feeds is None:
        shapes = feed_shapes(specs, dim_values=dim_values, batch_size=batch_size)
        feeds = random_feeds(specs, seed=seed, shapes=shapes)
    checked = check_feeds(feeds, specs, where="bench feeds")
    if batch_size is None:
        first = next(iter(checked.values()), None)
        batch_size = int(first.shape[0]) if first is not None and first.ndim > 0 else 1
    return checked, batch_size


def bench(
    model: ModelLike | SessionInfo,
    feeds: Mapping[str, Any] | None = None,
    *,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    batch_size: int | None = None,
    warmup: int = 5,
    repeat: int = 50,
    min_time_s: float = 0.0,
    max_repeat: int = 100_000,
    optimize: str | bool = "all",
    provider_options: Any = None,
    dim_values: Mapping[str, int] | None = None,
    io_binding: bool | None = None,
) -> BenchResult:
    """Time ``model`` on ``feeds``: ``warmup`` untimed runs, then at least ``repeat`` timed runs
    and at least ``min_time_s`` seconds of them (capped at ``max_repeat`` runs).

    ``model`` may be a :class:`SessionInfo` (then ``providers``/``threads``/``optimize`` are the
    session's own). Without ``feeds``, random feeds are drawn from the input shapes:
    ``batch_size`` replaces the symbolic first axis, other symbolic dims take ``dim_values`` or 1.
    ``io_binding`` (default: on for CUDA/TensorRT, off for CPU) copies inputs to the device once and
    binds outputs there, so host<->device copies are not timed.
    """
    info = _session(model, providers, threads, optimize, provider_options)
    checked, batch = bench_feeds(info, feeds, batch_size, dim_values)
    run = _runner(info, checked, io_binding, provider_options)
    for _ in range(max(warmup, 0)):
        run()
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    while len(times) < max(repeat, 1) or (clock() - start < min_time_s and len(times) < max_repeat):
        t0 = clock()
        run()
        times.append(clock() - t0)
    return BenchResult.from_times(times, batch, info)


def bench_interleaved(
    models: Mapping[str, ModelLike | SessionInfo],
    feeds: Mapping[str, Any] | None = None,
    *,
    rounds: int = 20,
    per_round: int = 5,
    warmup: int = 5,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = None,
    batch_size: int | None = None,
    optimize: str | bool = "all",
    provider_options: Any = None,
    dim_values: Mapping[str, int] | None = None,
    io_binding: bool | None = None,
) -> dict[str, BenchResult]:
    """Benchmark several models fairly: in each of ``rounds`` rounds every model runs
    ``per_round`` times, the starting model rotating from round to round.

    Values of ``models`` are models or :class:`SessionInfo` (make those with
    :func:`~onnxforge.runtime.session.make_session` to give one model other settings, e.g. the
    original with ``optimize="disable"`` next to it with ``"all"``). All models get the same feeds
    (random ones from the first model's input shapes when ``feeds`` is None).
    """
    if not models:
        return {}
    labels = list(models)
    infos = {
        label: _session(m, providers, threads, optimize, provider_options) for label, m in models.items()
    }
    first_feeds, batch = bench_feeds(infos[labels[0]], feeds, batch_size, dim_values)
    checked = {labels[0]: first_feeds}
    for label in labels[1:]:
        checked[label], _ = bench_feeds(infos[label], first_feeds, batch)
    runners = {label: _runner(infos[label], checked[label], io_binding, provider_options) for label in labels}
    for label in labels:
        for _ in range(max(warmup, 0)):
            runners[label]()
    times: dict[str, list[float]] = {label: [] for label in labels}
    clock = time.perf_counter
    for r in range(max(rounds, 1)):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for label in order:
            run = runners[label]
            for _ in range(max(per_round, 1)):
                t0 = clock()
                run()
                times[label].append(clock() - t0)
    return {label: BenchResult.from_times(times[label], batch, infos[label]) for label in labels}


def thread_time_interleaved(
    models: Mapping[str, ModelLike], feeds: Mapping[str, Any] | None, *, rounds: int, per_round: int,
    warmup: int = 3,
) -> dict[str, list[float]]:
    """Each model's run times (ms, ``rounds * per_round`` of them in order), timed as the calling
    thread's CPU time with one intra-op thread, interleaved like :func:`bench_interleaved` (random
    feeds from the first model's inputs when ``feeds`` is None).

    On the CPU provider with one intra-op thread onnxruntime runs the graph on the calling thread,
    so that thread's CPU time is the kernels' time and nothing else: other jobs on a shared machine
    do not enter it (wall time there is mostly waiting for a core).
    """
    sessions = {k: make_session(v, optimize="all", threads=1).session for k, v in models.items()}
    labels = list(sessions)
    feeds = dict(feeds) if feeds is not None else random_feeds(session_input_specs(sessions[labels[0]]), seed=0)
    for label in labels:  # first runs allocate and pick kernels
        for _ in range(warmup):
            sessions[label].run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in labels}
    clock = time.thread_time_ns
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            run = sessions[label].run
            for _ in range(per_round):
                t0 = clock()
                run(None, feeds)
                times[label].append((clock() - t0) / 1e6)
    return times


def ratios(results: Mapping[str, BenchResult], baseline: str, stat: str = "p50_ms") -> dict[str, float]:
    """``results[label].stat / results[baseline].stat`` for every label (below 1: faster)."""
    base = getattr(results[baseline], stat)
    return {label: getattr(r, stat) / base for label, r in results.items()}
