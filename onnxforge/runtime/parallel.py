"""Data-parallel inference: a dataset split across worker processes, outputs back in input order.

Each worker is a fresh process (``multiprocessing`` *spawn*: no forked onnxruntime thread pools,
the same on Linux, macOS and Windows) with its own session, ``threads_per_worker`` intra-op
threads, and optionally its own GPU (``devices``). The samples are cut into contiguous shards,
aligned to ``batch_size`` so that every worker runs exactly the batches a single process would
(same batches -> same arithmetic -> identical outputs); shard *i* goes to worker *i* and the
outputs are concatenated in shard order.

Timing: ``wall_s`` is the whole call (process start, imports, session creation included);
``compute_s`` starts when every worker has its session ready (they wait at a barrier) and ends
when the last one finishes, so ``n_samples / compute_s`` is the steady-state throughput that a
long-running service would see. With one worker the work runs in this process.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_module
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxforge.errors import CalibrationDataError, OnnxforgeError, ProviderError, UnsupportedModelError
from onnxforge.runtime._model import ModelLike, as_ir, input_specs, is_path
from onnxforge.runtime.providers import (
    CUDA,
    TENSORRT,
    normalize_provider_options,
    parse_provider_options,
    provider_name,
)

__all__ = ["ParallelResult", "run_parallel", "run_ray", "split_shards"]

_BARRIER_TIMEOUT_S = 600.0


@dataclass
class ParallelResult:
    outputs: dict[str, np.ndarray]
    n_samples: int
    workers: int
    threads_per_worker: int | None
    batch_size: int
    wall_s: float
    compute_s: float
    shards: list[int]
    providers_used: list[list[str]] = field(default_factory=list)
    fallbacks: list[list[tuple[str, str]]] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.n_samples / self.compute_s if self.compute_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_samples": self.n_samples,
            "workers": self.workers,
            "threads_per_worker": self.threads_per_worker,
            "batch_size": self.batch_size,
            "wall_s": self.wall_s,
            "compute_s": self.compute_s,
            "samples_per_s": self.samples_per_s,
            "shards": self.shards,
            "outputs": {k: list(v.shape) for k, v in self.outputs.items()},
            "providers_used": self.providers_used,
            "fallbacks": [[list(f) for f in fb] for fb in self.fallbacks],
        }


def split_shards(n_samples: int, workers: int, batch_size: int = 1) -> list[tuple[int, int]]:
    """``workers`` contiguous ``[start, stop)`` ranges covering ``n_samples``, cut on batch boundaries,
    as even as the batches allow (a worker may get nothing when there are fewer batches than workers)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n_batches = -(-n_samples // batch_size)
    per, extra = divmod(n_batches, workers)
    shards, start_batch = [], 0
    for i in range(workers):
        count = per + (1 if i < extra else 0)
        start, stop = start_batch * batch_size, min((start_batch + count) * batch_size, n_samples)
        shards.append((start, stop))
        start_batch += count
    return shards


def _load_arrays(data: Any) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        return {str(k): np.asarray(v) for k, v in data.items()}
    if is_path(data):
        path = os.fspath(data)
        if not os.path.isfile(path):
            raise CalibrationDataError(f"input data not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except Exception as exc:
            raise CalibrationDataError(f"cannot read {path} as .npz: {exc}") from exc
    raise CalibrationDataError(
        f"parallel run needs named arrays (a dict or an .npz path) with the sample axis first, "
        f"got {type(data).__name__}"
    )


def _plan(model_ir, arrays: dict[str, np.ndarray], batch_size: int) -> tuple[int, bool]:
    """(number of samples, whether the model has no batch axis so samples are fed one by one)."""
    specs = {n: s for n, s in input_specs(model_ir).items()}
    required = [n for n, s in specs.items() if not s.optional]
    missing = [n for n in required if n not in arrays]
    extra = [n for n in arrays if n not in specs]
    if missing or extra:
        parts = ([f"missing input(s) {missing}"] if missing else []) + ([f"unknown input(s) {extra}"] if extra else [])
        raise CalibrationDataError(f"input data: {' and '.join(parts)}; the model's inputs are {required}")
    lengths = set()
    squeeze = set()
    for name, array in arrays.items():
        if array.ndim == 0:
            raise CalibrationDataError(f"input data: array {name!r} is 0-d; the leading axis must be the samples")
        lengths.add(array.shape[0])
        shape = specs[name].shape
        if shape is not None and array.ndim == len(shape) + 1:
            squeeze.add(name)
        elif shape is not None and array.ndim != len(shape):
            raise CalibrationDataError(
                f"input data: {name!r} has shape {array.shape}; the model expects rank {len(shape)} "
                f"(or {len(shape) + 1} with a leading sample axis)"
            )
        elif shape is not None and isinstance(shape[0], int) and shape[0] >= 0 and shape[0] != batch_size:
            raise CalibrationDataError(
                f"input data: the model's batch axis of {name!r} is fixed at {shape[0]}; use --batch-size {shape[0]}"
            )
    if len(lengths) != 1:
        raise CalibrationDataError(f"input data: arrays disagree on the number of samples: "
                                   f"{ {n: a.shape[0] for n, a in arrays.items()} }")
    if lengths == {0}:
        raise CalibrationDataError("input data has no samples")
    if squeeze and len(squeeze) != len(arrays):
        raise CalibrationDataError("input data: some inputs have a sample axis beyond the model's shape and some do not")
    if squeeze and batch_size != 1:
        raise CalibrationDataError("the model has no batch axis: samples are fed one at a time, so batch_size must be 1")
    return lengths.pop(), bool(squeeze)


def _run_shard(session, arrays: dict[str, np.ndarray], batch_size: int, squeeze: bool) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    n = next(iter(arrays.values())).shape[0] if arrays else 0
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for lo in range(0, n, batch_size):
        feeds = {k: (a[lo] if squeeze else a[lo : lo + batch_size]) for k, a in arrays.items()}
        for name, out in zip(names, session.run(names, feeds)):
            collected[name].append(out)
    return {name: _join(name, parts, squeeze) for name, parts in collected.items()}


def _join(name: str, parts: list[np.ndarray], squeeze: bool) -> np.ndarray:
    try:
        if squeeze:
            return np.stack(parts)
        return np.concatenate(parts, axis=0)
    except ValueError as exc:
        raise UnsupportedModelError(
            f"output {name!r} cannot be joined across batches ({exc}); data-parallel runs need outputs "
            f"whose leading axis is the batch"
        ) from None


def _session(model_arg, providers, threads, provider_options, optimize):
    from onnxforge.runtime.session import make_session

    return make_session(model_arg, providers, threads=threads, optimize=optimize, provider_options=provider_options)


def _worker(index, model_arg, arrays, batch_size, squeeze, providers, threads, provider_options, optimize,
            barrier, results) -> None:  # pragma: no cover - runs in a child process
    try:
        import warnings

        with warnings.catch_warnings(record=True):
            info = _session(model_arg, providers, threads, provider_options, optimize)
        try:
            barrier.wait(_BARRIER_TIMEOUT_S)
        except Exception:
            return  # another worker failed; it reports
        start = time.monotonic()
        outputs = _run_shard(info.session, arrays, batch_size, squeeze)
        end = time.monotonic()
        results.put((index, "ok", outputs, start, end, info.providers_used, info.fallbacks))
    except BaseException as exc:  # report, never hang the others
        try:
            barrier.abort()
        except Exception:
            pass
        kind = "user" if isinstance(exc, OnnxforgeError) else "bug"
        results.put((index, kind, f"{type(exc).__name__}: {exc}", traceback.format_exc(), None, None, None))


def _worker_options(provider_options: Any, providers: Sequence[str], device: int | None) -> dict[str, Any]:
    """Provider options for one worker: the shared ones, with ``device_id`` set for its GPU."""
    options = normalize_provider_options(provider_options)
    if device is None:
        return options
    for name in dict.fromkeys(provider_name(p) for p in providers):
        if name in (TENSORRT, CUDA):
            current = options.get(name)
            options[name] = (
                parse_provider_options(name, {"device_id": device})
                if current is None
                else dataclasses.replace(current, device_id=device)
            )
    return options


def run_parallel(
    model: ModelLike,
    data: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    workers: int = 2,
    threads_per_worker: int | None = None,
    batch_size: int = 1,
    providers: Sequence[str] = ("cpu",),
    provider_options: Any = None,
    optimize: str | bool = "all",
    devices: Sequence[int] | None = None,
) -> ParallelResult:
    """Run ``model`` over every sample of ``data`` with ``workers`` processes; outputs in input order.

    Args:
        data: named arrays (dict or ``.npz`` path) whose leading axis is the sample axis.
        threads_per_worker: intra-op threads of each worker's session; default
            ``max(1, os.cpu_count() // workers)`` so the workers do not oversubscribe the cores.
        batch_size: samples per ``session.run`` (for models with a batch axis).
        devices: GPU ids; worker ``i`` runs on ``devices[i % len(devices)]`` (CUDA/TensorRT).
    """
    if workers < 1:
        raise ProviderError(f"workers must be >= 1, got {workers}")
    if batch_size < 1:
        raise CalibrationDataError(f"batch_size must be >= 1, got {batch_size}")
    if threads_per_worker is not None and threads_per_worker < 0:
        raise ProviderError(f"threads per worker must be >= 0, got {threads_per_worker}")
    if threads_per_worker is None:
        threads_per_worker = max(1, (os.cpu_count() or 1) // workers)
    t_start = time.perf_counter()
    model_ir = as_ir(model)
    arrays = _load_arrays(data)
    n_samples, squeeze = _plan(model_ir, arrays, batch_size)
    if is_path(model):
        model_arg: Any = os.fspath(model)
    else:
        from onnxforge.runtime._model import OrtSource

        with OrtSource(model_ir) as src:
            if not isinstance(src.arg, bytes):
                raise UnsupportedModelError("a model with external data must be given as a path for parallel runs")
            model_arg = src.arg
    step = 1 if squeeze else batch_size
    workers = min(workers, max(1, -(-n_samples // step)))  # no worker without a batch
    shards = split_shards(n_samples, workers, step)
    shard_arrays = [{k: a[lo:hi] for k, a in arrays.items()} for lo, hi in shards]
    options = [
        _worker_options(provider_options, providers, None if not devices else devices[i % len(devices)])
        for i in range(workers)
    ]

    if workers == 1:
        info = _session(model_arg, providers, threads_per_worker, options[0], optimize)
        start = time.perf_counter()
        outputs = _run_shard(info.session, shard_arrays[0], batch_size, squeeze)
        compute = time.perf_counter() - start
        return ParallelResult(
            outputs, n_samples, 1, threads_per_worker, batch_size, time.perf_counter() - t_start, compute,
            [n_samples], [list(info.providers_used)], [list(info.fallbacks)],
        )

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, model_arg, shard_arrays[i], batch_size, squeeze, tuple(providers), threads_per_worker,
                  options[i], optimize, barrier, results),
            daemon=True,
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    received: dict[int, tuple] = {}
    try:
        while len(received) < workers:
            try:
                item = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in received]
                if dead and results.empty():
                    time.sleep(0.2)
                    if results.empty():
                        raise OnnxforgeError(
                            f"worker process(es) {dead} exited without a result (exit codes "
                            f"{[procs[i].exitcode for i in dead]}); out of memory?"
                        ) from None
                continue
            index, status = item[0], item[1]
            if status == "user":
                raise ProviderError(f"worker {index}: {item[2]}")
            if status == "bug":
                raise RuntimeError(f"worker {index} failed: {item[2]}\n{item[3]}")
            received[index] = item
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    ordered = [received[i] for i in range(workers)]
    names = list(ordered[0][2])
    outputs = {}
    for name in names:
        outputs[name] = _join(name, [r[2][name] for r in ordered], squeeze=False)
    compute = max(r[4] for r in ordered) - min(r[3] for r in ordered)
    return ParallelResult(
        outputs, n_samples, workers, threads_per_worker, batch_size, time.perf_counter() - t_start, compute,
        [hi - lo for lo, hi in shards], [list(r[5]) for r in ordered], [list(r[6]) for r in ordered],
    )


# --------------------------------------------------------------------------- Ray


def _ray_shard(model_arg, arrays, batch_size, squeeze, providers, threads, provider_options, optimize):
    """One shard as a Ray task: its own session, the same batches a local worker would run."""
    import warnings

    with warnings.catch_warnings(record=True):
        info = _session(model_arg, providers, threads, provider_options, optimize)
    start = time.time()
    outputs = _run_shard(info.session, arrays, batch_size, squeeze)
    return outputs, start, time.time(), list(info.providers_used), list(info.fallbacks)


def run_ray(
    model: ModelLike,
    data: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    workers: int = 2,
    threads_per_worker: int | None = None,
    batch_size: int = 1,
    providers: Sequence[str] = ("cpu",),
    provider_options: Any = None,
    optimize: str | bool = "all",
    devices: Sequence[int] | None = None,
    address: str | None = None,
) -> ParallelResult:
    """:func:`run_parallel` on Ray: shard ``i`` is Ray task ``i`` (``num_cpus = threads_per_worker``).

    The shards and batches are those of :func:`run_parallel`, so the outputs equal a local run's, in the
    same order. Connects to ``address`` (a cluster, e.g. from ``RAY_ADDRESS``) or, when Ray is not
    initialized yet, starts a local instance for the call and shuts it down afterwards. The model
    travels as bytes (models with external data are refused). ``compute_s`` spans the first task's
    start to the last task's end (wall clocks of the nodes; on a cluster they may differ slightly).
    """
    try:
        import ray
    except ImportError:
        from onnxforge.errors import MissingDependencyError

        raise MissingDependencyError("--executor ray needs Ray: pip install 'onnxforge[ray]'") from None
    if devices:
        raise ProviderError("the Ray executor runs on CPU; leave devices out")
    if workers < 1:
        raise ProviderError(f"workers must be >= 1, got {workers}")
    if threads_per_worker is None:
        threads_per_worker = 1
    t_start = time.perf_counter()
    model_ir = as_ir(model)
    arrays = _load_arrays(data)
    n_samples, squeeze = _plan(model_ir, arrays, batch_size)
    from onnxforge.runtime._model import OrtSource

    with OrtSource(model_ir) as src:
        if not isinstance(src.arg, bytes):
            raise UnsupportedModelError("the Ray executor needs a model without external data")
        model_arg = src.arg
    step = 1 if squeeze else batch_size
    workers = min(workers, max(1, -(-n_samples // step)))
    shards = split_shards(n_samples, workers, step)
    options = normalize_provider_options(provider_options)
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = max(os.cpu_count() or 1, workers * max(1, threads_per_worker))
        ray.init(**kwargs)
        started = True
    try:
        task = ray.remote(_ray_shard).options(num_cpus=max(1, threads_per_worker))
        model_ref = ray.put(model_arg)
        refs = [task.remote(model_ref, {k: a[lo:hi] for k, a in arrays.items()}, batch_size, squeeze,
                            tuple(providers), threads_per_worker, options, optimize) for lo, hi in shards]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, OnnxforgeError):
                raise cause from None
            raise
    finally:
        if started:
            ray.shutdown()
    names = list(results[0][0])
    outputs = {name: _join(name, [r[0][name] for r in results], squeeze=False) for name in names}
    compute = max(r[2] for r in results) - min(r[1] for r in results)
    return ParallelResult(
        outputs, n_samples, workers, threads_per_worker, batch_size, time.perf_counter() - t_start, compute,
        [hi - lo for lo, hi in shards], [r[3] for r in results], [r[4] for r in results],
    )
