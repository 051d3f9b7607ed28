"""Batch-size and thread tuning, and a timing loop that uses IO binding on GPU providers.

``tune`` sweeps batch sizes (when the model has a dynamic batch axis) and intra-op thread counts,
measures latency and throughput for every setting, and recommends the setting with the highest
throughput whose latency stays under an optional bound.

Fairness: one session per thread count (changing threads needs a new session); inside it, the
batch sizes are interleaved round by round with a rotating start, like
:func:`onnxforge.runtime.bench.bench_interleaved`, so machine noise lands on all of them alike.
Thread counts are measured one after the other, not interleaved: an idle onnxruntime thread pool
keeps spinning for a while after a run and would steal the cores of the next session.

IO binding (:func:`make_runner`): on CUDA/TensorRT, ``session.run(None, feeds)`` copies every input
host -> device and every output device -> host on each call, so a benchmark would time PCIe
copies as much as the model. With IO binding the inputs are copied to the device once and the
outputs stay bound on the device; each timed call is only ``run_with_iobinding``. It is on by
default when the session's primary provider is CUDA or TensorRT and off on CPU (where there is
nothing to copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxforge.errors import ProviderError
from onnxforge.runtime._model import ModelLike, as_ir, input_specs
from onnxforge.runtime.bench import BenchResult, bench_feeds
from onnxforge.runtime.providers import CUDA, TENSORRT, normalize_provider_options
from onnxforge.runtime.session import SessionInfo, make_session

__all__ = [
    "BatchAxis",
    "Runner",
    "TunePoint",
    "TuneResult",
    "batch_axis",
    "make_runner",
    "measure",
    "recommend",
    "time_runner",
    "tune",
]

GPU_PROVIDERS = (CUDA, TENSORRT)
LATENCY_STATS = ("p50", "p90", "p99")


# --------------------------------------------------------------------------- running and timing


@dataclass
class Runner:
    """One inference call on fixed feeds: ``runner()``. ``io_binding`` says how it feeds the session."""

    call: Callable[[], Any]
    io_binding: bool
    device: str = "cpu"
    device_id: int = 0
    keep_alive: list[Any] = field(default_factory=list, repr=False)  # device copies of the inputs

    def __call__(self) -> Any:
        return self.call()


def _ortvalue_from_numpy(array: np.ndarray, device: str, device_id: int) -> Any:
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array, device, device_id)


def session_device(info: SessionInfo, provider_options: Any = None) -> tuple[str, int]:
    """(onnxruntime device type, device id) where the session's primary provider keeps tensors."""
    if info.provider not in GPU_PROVIDERS:
        return "cpu", 0
    options = normalize_provider_options(provider_options).get(info.provider)
    return "cuda", int(getattr(options, "device_id", 0) or 0)


def make_runner(
    info: SessionInfo,
    feeds: Mapping[str, np.ndarray],
    *,
    io_binding: bool | None = None,
    provider_options: Any = None,
    ortvalue_factory: Callable[[np.ndarray, str, int], Any] | None = None,
) -> Runner:
    """A zero-argument callable running ``info``'s session once on ``feeds``.

    ``io_binding``: None (default) binds on CUDA/TensorRT and not on CPU; True/False force it.
    With binding, each input is copied to the session's device once, here (through
    ``ortvalue_factory``, default ``onnxruntime.OrtValue.ortvalue_from_numpy``), every output is
    bound to the device, and a call is ``session.run_with_iobinding(binding)``: no host<->device
    copies are timed. Outputs are not fetched (``binding.copy_outputs_to_cpu()`` would).
    """
    session = info.session
    device, device_id = session_device(info, provider_options)
    use_binding = device != "cpu" if io_binding is None else bool(io_binding)
    if not use_binding:
        feeds = dict(feeds)
        return Runner(lambda: session.run(None, feeds), io_binding=False)
    if not hasattr(session, "io_binding"):
        raise ProviderError("io_binding requested but this session has no io_binding()")
    factory = ortvalue_factory or _ortvalue_from_numpy
    binding = session.io_binding()
    on_device = []
    for name, array in feeds.items():
        value = factory(np.ascontiguousarray(array), device, device_id)
        binding.bind_ortvalue_input(name, value)
        on_device.append(value)
    for output in session.get_outputs():
        binding.bind_output(output.name, device, device_id)

    def call() -> Any:
        session.run_with_iobinding(binding)
        return binding

    return Runner(call, io_binding=True, device=device, device_id=device_id, keep_alive=on_device)


def time_runner(
    runner: Callable[[], Any],
    *,
    warmup: int = 5,
    repeat: int = 50,
    min_time_s: float = 0.0,
    max_repeat: int = 100_000,
) -> list[float]:
    """``warmup`` untimed calls, then at least ``repeat`` timed ones and ``min_time_s`` seconds of them."""
    for _ in range(max(warmup, 0)):
        runner()
    times: list[float] = []
    clock = time.perf_counter
    start = clock()
    while len(times) < max(repeat, 1) or (clock() - start < min_time_s and len(times) < max_repeat):
        t0 = clock()
        runner()
        times.append(clock() - t0)
    return times


def measure(
    info: SessionInfo,
    feeds: Mapping[str, Any] | None = None,
    *,
    batch_size: int | None = None,
    warmup: int = 5,
    repeat: int = 50,
    min_time_s: float = 0.0,
    io_binding: bool | None = None,
    provider_options: Any = None,
    dim_values: Mapping[str, int] | None = None,
    ortvalue_factory: Callable[[np.ndarray, str, int], Any] | None = None,
) -> tuple[BenchResult, Runner]:
    """Like :func:`onnxforge.runtime.bench.bench` on a session, with IO binding on GPU providers.

    Returns the result and the runner (whose ``io_binding`` says whether binding was used).
    """
    checked, batch = bench_feeds(info, feeds, batch_size, dim_values)
    runner = make_runner(
        info, checked, io_binding=io_binding, provider_options=provider_options, ortvalue_factory=ortvalue_factory
    )
    times = time_runner(runner, warmup=warmup, repeat=repeat, min_time_s=min_time_s)
    return BenchResult.from_times(times, batch, info), runner


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class BatchAxis:
    """Whether the model's inputs share a dynamic leading (batch) axis; else its fixed size."""

    dynamic: bool
    size: int | None
    reason: str = ""


def batch_axis(model: ModelLike) -> BatchAxis:
    """The batch axis of ``model``: dynamic when axis 0 of every required input is symbolic."""
    specs = [s for s in input_specs(model).values() if not s.optional]
    if not specs:
        return BatchAxis(False, None, "the model has no inputs")
    sizes = set()
    for spec in specs:
        if spec.shape is None:
            return BatchAxis(False, None, f"input {spec.name!r} has no shape")
        if len(spec.shape) == 0:
            return BatchAxis(False, None, f"input {spec.name!r} is a scalar (no batch axis)")
        first = spec.shape[0]
        if isinstance(first, int) and first >= 0:
            sizes.add(first)
    if not sizes:
        return BatchAxis(True, None)
    size = min(sizes)
    return BatchAxis(False, size, f"the model has a fixed batch axis of {size}")


@dataclass
class TunePoint:
    """One measured setting."""

    batch_size: int
    threads: int | None
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_per_s: float  # batch / p50
    n: int
    meets_bound: bool = True
    min_ms: float | None = None  # fastest run: the uncontended latency on a busy machine

    def latency(self, stat: str) -> float:
        return getattr(self, f"{stat}_ms")


@dataclass
class TuneResult:
    points: list[TunePoint]
    recommended: TunePoint | None
    dynamic_batch: bool
    batch_sizes: list[int]
    threads: list[int | None]
    max_latency_ms: float | None
    latency_stat: str
    providers_used: list[str]
    fallbacks: list[tuple[str, str]]
    io_binding: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fallbacks"] = [list(f) for f in self.fallbacks]
        return d


def recommend(
    points: Sequence[TunePoint], max_latency_ms: float | None = None, latency_stat: str = "p90"
) -> TunePoint | None:
    """The point with the highest throughput whose ``latency_stat`` is within ``max_latency_ms``
    (ties: the lower latency, then fewer threads); None when no point meets the bound."""
    eligible = [p for p in points if max_latency_ms is None or p.latency(latency_stat) <= max_latency_ms]
    if not eligible:
        return None
    return max(eligible, key=lambda p: (p.throughput_per_s, -p.latency(latency_stat), -(p.threads or 0)))


ProgressCallback = Callable[[int, int, str], None]


def tune(
    model: ModelLike,
    *,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    threads: Sequence[int | None] = (1, 2),
    providers: Sequence[str] = ("cpu",),
    provider_options: Any = None,
    optimize: str | bool = "all",
    max_latency_ms: float | None = None,
    latency_stat: str = "p90",
    rounds: int = 5,
    per_round: int = 4,
    warmup: int = 2,
    io_binding: bool | None = None,
    dim_values: Mapping[str, int] | None = None,
    progress: ProgressCallback | None = None,
    session_factory: Callable[..., Any] | None = None,
) -> TuneResult:
    """Sweep batch sizes x thread counts and recommend the highest-throughput setting within the bound.

    A model with a fixed batch axis (or none) is swept over threads only, at its own batch size; the
    result's ``notes`` say so. Each setting is timed ``rounds * per_round`` times after ``warmup``
    calls; feeds are random (throughput does not depend on the values for these models).
    ``progress(done, total, label)`` is called after every timed block.
    """
    if latency_stat not in LATENCY_STATS:
        raise ProviderError(f"latency_stat must be one of {LATENCY_STATS}, got {latency_stat!r}")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ProviderError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    thread_counts = list(dict.fromkeys(threads)) or [None]
    for t in thread_counts:
        if t is not None and (not isinstance(t, int) or t < 0):
            raise ProviderError(f"thread counts must be non-negative integers (0 = onnxruntime decides), got {t!r}")
    if max_latency_ms is not None and max_latency_ms <= 0:
        raise ProviderError(f"max latency must be positive, got {max_latency_ms}")

    model_ir = as_ir(model)
    axis = batch_axis(model_ir)
    notes: list[str] = []
    if not axis.dynamic:
        fixed = axis.size or 1
        notes.append(f"{axis.reason}: batch size not swept, only threads (batch {fixed})")
        sizes = [fixed]
    source = model if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else model_ir

    total = len(thread_counts) * len(sizes) * max(rounds, 1)
    done = 0
    points: list[TunePoint] = []
    info: SessionInfo | None = None
    used_binding = False
    for t in thread_counts:
        info = make_session(
            source, providers, threads=t, optimize=optimize, provider_options=provider_options,
            session_factory=session_factory,
        )
        runners: dict[int, Runner] = {}
        batches: dict[int, int] = {}
        for b in sizes:
            feeds, batches[b] = bench_feeds(info, None, b if axis.dynamic else None, dim_values)
            runners[b] = make_runner(info, feeds, io_binding=io_binding, provider_options=provider_options)
            used_binding = runners[b].io_binding
            for _ in range(max(warmup, 0)):
                runners[b]()
        times: dict[int, list[float]] = {b: [] for b in sizes}
        clock = time.perf_counter
        for r in range(max(rounds, 1)):
            order = sizes[r % len(sizes):] + sizes[: r % len(sizes)]
            for b in order:
                run = runners[b]
                for _ in range(max(per_round, 1)):
                    t0 = clock()
                    run()
                    times[b].append(clock() - t0)
                done += 1
                if progress is not None:
                    progress(done, total, f"threads={_fmt_threads(t)} batch={batches[b]}")
        for b in sizes:
            result = BenchResult.from_times(times[b], batches[b], info)
            points.append(
                TunePoint(
                    batch_size=batches[b], threads=t, p50_ms=result.p50_ms, p90_ms=result.p90_ms,
                    p99_ms=result.p99_ms, throughput_per_s=result.throughput_per_s, n=result.n,
                    min_ms=result.min_ms,
                )
            )
    for p in points:
        p.meets_bound = max_latency_ms is None or p.latency(latency_stat) <= max_latency_ms
    best = recommend(points, max_latency_ms, latency_stat)
    if best is None and points:
        fastest = min(points, key=lambda p: p.latency(latency_stat))
        notes.append(
            f"no setting meets {latency_stat} <= {max_latency_ms:g} ms; the lowest {latency_stat} is "
            f"{fastest.latency(latency_stat):.3g} ms (batch {fastest.batch_size}, threads {_fmt_threads(fastest.threads)})"
        )
    assert info is not None
    return TuneResult(
        points=points,
        recommended=best,
        dynamic_batch=axis.dynamic,
        batch_sizes=sizes,
        threads=thread_counts,
        max_latency_ms=max_latency_ms,
        latency_stat=latency_stat,
        providers_used=list(info.providers_used),
        fallbacks=list(info.fallbacks),
        io_binding=used_binding,
        notes=notes,
    )


def _fmt_threads(t: int | None) -> str:
    return "default" if t in (None, 0) else str(t)
