"""Evaluating one candidate of ``onnxforge tune``: build it, score it, time it.

1. **Build**: the candidate's pipeline string runs through :class:`~onnxforge.passes.manager.Pipeline`
   on a fresh copy of the original, with the same :class:`~onnxforge.passes.base.PassContext` that
   ``onnxforge optimize --config`` builds (target, calibration data, seed), so the saved pipeline
   reproduces the model byte for byte.
2. **Score** on the evaluation data (an ``.npz``: one array per model input, named like the input,
   leading axis = samples, plus ``labels`` for ``top1``). Metrics, and what *drop* means:

   - ``top1``: accuracy in percent against ``labels`` (first output with a class axis); drop in
     percentage points, ``baseline - value``;
   - ``cosine``: mean over samples of the cosine similarity of the candidate's outputs to the
     original's; drop ``1 - value``;
   - ``max-abs``: the largest absolute difference to the original's outputs; drop ``value``;
   - ``module:function``: ``function(outputs, data) -> float``, higher is better, where ``outputs``
     is ``{output name: array}`` (samples concatenated on axis 0, also for an output whose batch axis
     is another, such as a CTC recognizer's ``(T, N, C)``: it arrives as ``(N, T, C)``) and ``data``
     the eval arrays;
     drop ``baseline - value``. A function with a third parameter also gets the original model's
     outputs on the same data (``function(outputs, data, original_outputs)``): a task metric that
     scores agreement with the fp32 model (detections' F1, decoded strings) needs no labels.

   **Early stop**: the metric is first computed on the first ``quick_samples`` samples. A candidate
   whose quick result already breaks ``max_drop`` is not evaluated further and not timed. For
   ``max-abs`` and ``cosine`` the test is exact (a max over a subset is a lower bound of the max;
   the subset's summed ``1 - cos`` divided by the full count is a lower bound of the mean drop). For
   ``top1`` it is statistical: stop when the quick drop exceeds ``max_drop`` by three standard errors
   of the disagreement rate plus one sample. A user metric stops at twice ``max_drop``.
3. **Time** (``latency="bench"``): the candidate and the original run interleaved in the same
   process, each round alternating who goes first (:func:`~onnxforge.runtime.bench.bench_interleaved`);
   the latency ratio is the median over rounds of the per-round ratio of medians, so a noisy
   machine moves both sides alike. ``latency="cpu"`` (target cpu, one thread) times the thread CPU
   time of each run instead (:func:`onnxforge.passes.prune.latency.timed`): on a shared machine
   whose load is several times its core count, wall time is mostly waiting for a core.
   ``latency="size"`` uses the serialized-size ratio instead: a deterministic stand-in, for tests
   and for size-bound targets.

Everything an evaluator needs is in :class:`EvalSpec`, which pickles, so worker processes (and Ray
tasks) rebuild the same evaluator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import time
import warnings
from typing import Any, Callable

import numpy as np

from onnxforge.errors import CalibrationDataError, OnnxforgeError, PipelineSpecError

BUILTIN_METRICS = ("top1", "cosine", "max-abs")


@dataclasses.dataclass
class EvalSettings:
    """How candidates are scored and timed (part of the cache key)."""

    metric: str = "top1"
    max_drop: float | None = None
    latency: str = "bench"  # bench | cpu | size
    batch_size: int = 1
    threads: int | None = 1
    optimize: str = "all"  # onnxruntime graph optimizations while timing (as deployed)
    rounds: int = 15
    per_round: int = 5
    warmup: int = 3
    quick_samples: int = 64
    eval_batch: int = 256
    target: str = "cpu"
    seed: int = 0
    num_samples: int | None = None

    def key(self) -> dict[str, Any]:
        """The settings that change a result (timing repetitions do not: they only change noise)."""
        return {k: getattr(self, k) for k in ("metric", "latency", "batch_size", "threads", "optimize",
                                             "target", "seed", "num_samples")}


@dataclasses.dataclass
class EvalSpec:
    """Everything needed to rebuild an :class:`Evaluator` in another process."""

    model_bytes: bytes
    eval_arrays: dict[str, np.ndarray]
    settings: EvalSettings
    calibration: Any = None  # a path (str) to .npz / folder, or a dict of arrays, or None
    model_path: str | None = None
    # where budgeted quantize-int8 candidates write their decision records (see .budget); None: none
    decisions_dir: str | None = None


@dataclasses.dataclass
class Candidate:
    """The result of evaluating one pipeline."""

    pipeline: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: str = "ok"  # ok | early-stop | failed
    metric: float | None = None
    baseline_metric: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    baseline_latency_ms: float | None = None
    latency_ratio: float | None = None
    size_bytes: int | None = None
    size_ratio: float | None = None
    model_sha256: str | None = None
    build_s: float = 0.0
    eval_s: float = 0.0
    error: str | None = None
    quick_drop: float | None = None
    quick_samples: int | None = None
    cached: bool = False
    index: int = -1  # evaluation order within the run that produced it

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def within(self, max_drop: float | None) -> bool:
        return self.ok and (max_drop is None or (self.drop is not None and self.drop <= max_drop + 1e-12))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------- metrics


@dataclasses.dataclass
class Metric:
    name: str
    higher_is_better: bool
    fn: Callable[[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]], float]
    kind: str  # top1 | cosine | max-abs | custom

    def drop(self, baseline: float, value: float) -> float:
        return baseline - value if self.higher_is_better else value - baseline


def _class_output(outputs: dict[str, np.ndarray]) -> np.ndarray:
    from onnxforge.runtime.compare import class_axis

    for arr in outputs.values():
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating) and class_axis(arr.shape) is not None:
            axis = class_axis(arr.shape)
            return np.argmax(arr, axis=axis).reshape(len(arr), -1)[:, 0]
    raise CalibrationDataError("metric top1: no model output has a class axis ([N, classes])")


def _top1(cand: dict[str, np.ndarray], orig: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> float:
    pred = _class_output(cand)
    return float(np.mean(pred == np.asarray(data["labels"]).reshape(-1)[: len(pred)]) * 100.0)


def _cosines(cand: dict[str, np.ndarray], orig: dict[str, np.ndarray]) -> np.ndarray:
    # The one output comparator (outputs paired by name; a missing output fails the candidate).
    from onnxforge.runtime.compare import sample_cosines

    return sample_cosines(orig, cand)


def _cosine(cand, orig, data) -> float:
    return float(np.mean(_cosines(cand, orig)))


def _max_abs(cand, orig, data) -> float:
    from onnxforge.runtime.compare import compare

    return float(compare(orig, cand).max_abs)


# one definition for tune's metrics and quantize-int8's max_drop metric (a third parameter: the reference outputs)
from onnxforge.passes.quantize.fallback import _positional_arity  # noqa: E402


def resolve_metric(name: str) -> Metric:
    """A built-in metric by name, or ``module:function`` (imported; higher is better), called as
    ``function(candidate_outputs, data)`` or, when it takes three parameters,
    ``function(candidate_outputs, data, original_outputs)`` (outputs: dicts by output name)."""
    if name == "top1":
        return Metric(name, True, _top1, "top1")
    if name == "cosine":
        return Metric(name, True, _cosine, "cosine")
    if name == "max-abs":
        return Metric(name, False, _max_abs, "max-abs")
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise PipelineSpecError(f"metric {name!r}: cannot import {attr!r} from {module!r}: {e}") from e
        if not callable(fn):
            raise PipelineSpecError(f"metric {name!r} is not callable")
        # fn(candidate_outputs, data) or, with a third parameter, fn(candidate_outputs, data,
        # original_outputs): task metrics that score against the fp32 model's own results.
        if _positional_arity(fn) >= 3:
            return Metric(name, True, lambda cand, orig, data: float(fn(cand, data, orig)), "custom")
        return Metric(name, True, lambda cand, orig, data: float(fn(cand, data)), "custom")
    raise PipelineSpecError(
        f"unknown metric {name!r}: use {', '.join(BUILTIN_METRICS)} or module:function (higher is better)"
    )


# --------------------------------------------------------------------------------- evaluator


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_eval_data(path: str, model_inputs: list[str], metric: str) -> dict[str, np.ndarray]:
    """Read the eval ``.npz``: arrays named like the model inputs (samples first), ``labels`` for top1."""
    from onnxforge.runtime.data import read_npz

    arrays = read_npz(path, "eval data")
    check_eval_data(arrays, model_inputs, metric, where=str(path))
    return arrays


def check_eval_data(arrays: dict[str, np.ndarray], model_inputs: list[str], metric: str, where: str = "eval data") -> None:
    missing = [n for n in model_inputs if n not in arrays]
    if missing:
        raise CalibrationDataError(
            f"{where}: no array for model input(s) {missing} (it has {sorted(arrays)}); the eval .npz holds one "
            f"array per model input, named like it, leading axis = samples, plus 'labels' for --metric top1"
        )
    n = {len(arrays[k]) for k in model_inputs}
    if len(n) != 1:
        raise CalibrationDataError(f"{where}: input arrays disagree on the number of samples")
    if metric == "top1":
        if "labels" not in arrays:
            raise CalibrationDataError(
                f"{where}: --metric top1 needs a 'labels' array (integer class per sample) next to the inputs"
            )
        if len(arrays["labels"]) != next(iter(n)):
            raise CalibrationDataError(f"{where}: 'labels' has {len(arrays['labels'])} entries, inputs {next(iter(n))}")


class Evaluator:
    """Builds, scores and times candidates against one original model."""

    def __init__(self, spec: EvalSpec):
        from onnxforge.ir.io import load

        self.spec = spec
        self.settings = spec.settings
        self.metric = resolve_metric(self.settings.metric)
        self.model_bytes = spec.model_bytes
        self.model_sha256 = sha256(spec.model_bytes)
        original = load(spec.model_bytes)
        self.input_names = [v.name for v in original.graph.inputs]
        initializer_names = set(original.graph.initializers)
        self.input_names = [n for n in self.input_names if n not in initializer_names]
        self.data = spec.eval_arrays
        check_eval_data(self.data, self.input_names, self.metric.kind)
        self.n = len(self.data[self.input_names[0]])
        self._calibration = None
        self._original_outputs: dict[str, np.ndarray] | None = None
        self._batch_axes: dict[str, int] | None = None
        self._baseline: float | None = None
        self._baseline_quick: float | None = None

    # --- building -------------------------------------------------------------------------------

    def calibration(self, model: Any):
        if self.spec.calibration is None:
            return None
        from onnxforge.runtime import data as calibration

        return calibration.load(self.spec.calibration, model)

    def build(self, pipeline: str) -> bytes:
        """The candidate's model bytes, built exactly as ``onnxforge optimize --config`` would."""
        from onnxforge.ir.io import model_to_bytes

        return model_to_bytes(self.build_model(pipeline))

    def build_model(self, pipeline: str):
        """The candidate as an ``onnx_ir.Model`` (see :meth:`build`)."""
        return self.build_result(pipeline).model

    def build_result(self, pipeline: str):
        """The :class:`~onnxforge.passes.manager.PipelineResult` of building the candidate (model and
        per-pass report)."""
        from onnxforge.ir.io import load
        from onnxforge.passes.base import PassContext
        from onnxforge.passes.manager import Pipeline
        from onnxforge.passes.spec import parse_pipeline
        from onnxforge.tune.budget import context_options

        model = load(self.model_bytes)
        s = self.settings
        specs = parse_pipeline(pipeline)
        options: dict[str, Any] = {"num_samples": s.num_samples} if s.num_samples else {}
        # quantize-int8(max_drop=...) measures tune's own metric on the search data (see .budget)
        options.update(context_options(self, specs, pipeline))
        context = PassContext(target=s.target, calibration_data=self.calibration(model), seed=s.seed,
                              options=options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Pipeline(specs, context=context).run(model)

    # --- scoring --------------------------------------------------------------------------------

    def _session(self, model_bytes: bytes):
        from onnxforge.runtime.session import make_session

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_session(model_bytes, (self.settings.target,), threads=self.settings.threads,
                                optimize=self.settings.optimize).session

    @property
    def batch_axes(self) -> dict[str, int]:
        """Each output's batch axis in the original model (:func:`onnxforge.runtime.batch.batch_axes`):
        not 0 for a recognizer's ``(T, N, C)`` logits."""
        if self._batch_axes is None:
            from onnxforge.runtime.batch import batch_axes

            self._batch_axes = batch_axes(self.model_bytes, {k: self.data[k][:1] for k in self.input_names})
        return self._batch_axes

    def run(self, model_bytes: bytes, stop: int | None = None, session: Any = None) -> dict[str, np.ndarray]:
        """Outputs on the first ``stop`` eval samples (all by default), batched: samples on axis 0 of
        every output (an output whose batch axis is another, see :attr:`batch_axes`, is moved so)."""
        session = session or self._session(model_bytes)
        stop = self.n if stop is None else min(stop, self.n)
        first = session.get_inputs()[0]
        fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) else None
        step = fixed or self.settings.eval_batch
        names = [o.name for o in session.get_outputs()]
        chunks: list[list[np.ndarray]] = []
        for lo in range(0, stop, step):
            hi = min(lo + step, stop)
            feeds = {}
            for name in self.input_names:
                arr = self.data[name][lo:hi]
                if fixed and hi - lo < fixed:
                    arr = np.concatenate([arr, np.repeat(arr[-1:], fixed - (hi - lo), axis=0)])
                feeds[name] = arr
            outs = session.run(names, feeds)
            axes = self.batch_axes
            chunks.append([np.moveaxis(o, axes.get(n, 0), 0)[: hi - lo] if np.ndim(o) else o
                           for n, o in zip(names, outs)])
        return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(names)}

    def original_outputs(self) -> dict[str, np.ndarray]:
        if self._original_outputs is None:
            self._original_outputs = self.run(self.model_bytes)
        return self._original_outputs

    def _score(self, outputs: dict[str, np.ndarray], stop: int | None = None) -> float:
        orig = self.original_outputs()
        if stop is not None:
            orig = {k: v[:stop] for k, v in orig.items()}
            data = {k: v[:stop] for k, v in self.data.items()}
        else:
            data = self.data
        return self.metric.fn(outputs, orig, data)

    def baseline(self) -> float:
        if self._baseline is None:
            self._baseline = self._score(self.original_outputs())
        return self._baseline

    def quick_fails(self, quick: dict[str, np.ndarray], k: int) -> tuple[bool, float]:
        """Whether the result on the first ``k`` samples already breaks ``max_drop``, and its drop."""
        max_drop = self.settings.max_drop
        orig_quick = {name: v[:k] for name, v in self.original_outputs().items()}
        base = self.metric.fn(orig_quick, orig_quick, {n: v[:k] for n, v in self.data.items()})
        value = self._score(quick, k)
        drop = self.metric.drop(base, value)
        if max_drop is None or k >= self.n:
            return False, drop
        kind = self.metric.kind
        if kind == "max-abs":
            return drop > max_drop, drop
        if kind == "cosine":
            lower_bound = float(np.sum(1.0 - _cosines(quick, orig_quick))) / self.n
            return lower_bound > max_drop, drop
        if kind == "top1":
            a, b = _class_output(quick), _class_output(orig_quick)
            q = float(np.mean(a != b))
            margin = 100.0 * (3.0 * math.sqrt(max(q * (1 - q), 1.0 / k) / k) + 1.0 / k)
            return drop > max_drop + margin, drop
        return drop > 2.0 * max_drop, drop

    def score(self, cand: Candidate, model_bytes: bytes) -> Candidate:
        """Fill in ``metric``/``drop`` (or stop early), size and hash."""
        t0 = time.perf_counter()
        cand.model_sha256 = sha256(model_bytes)
        cand.size_bytes = len(model_bytes)
        cand.size_ratio = len(model_bytes) / len(self.model_bytes)
        cand.baseline_metric = self.baseline()
        try:
            session = self._session(model_bytes)
            k = min(self.settings.quick_samples, self.n)
            quick = self.run(model_bytes, k, session=session)
            fails, quick_drop = self.quick_fails(quick, k)
            cand.quick_drop, cand.quick_samples = quick_drop, k
            if fails:
                cand.status = "early-stop"
                cand.drop = quick_drop
                cand.metric = self.metric.fn(quick, {n: v[:k] for n, v in self.original_outputs().items()},
                                             {n: v[:k] for n, v in self.data.items()})
            else:
                outputs = self.run(model_bytes, session=session)
                cand.metric = self._score(outputs)
                cand.drop = self.metric.drop(cand.baseline_metric, cand.metric)
        except OnnxforgeError:
            raise
        except Exception as e:  # a candidate onnxruntime cannot run is a failed candidate, not a crash
            cand.status, cand.error = "failed", f"running it: {type(e).__name__}: {str(e).splitlines()[0]}"
        cand.eval_s += time.perf_counter() - t0
        return cand

    # --- timing ---------------------------------------------------------------------------------

    def bench_feeds(self) -> dict[str, np.ndarray]:
        b = max(1, self.settings.batch_size)
        return {name: np.ascontiguousarray(self.data[name][:b]) for name in self.input_names}

    def time(self, cand: Candidate, model_bytes: bytes) -> Candidate:
        """Fill in the latency fields (``latency="size"``: the size ratio stands in)."""
        s = self.settings
        if not cand.ok:
            return cand
        if s.latency == "size":
            cand.latency_ratio = cand.size_ratio
            return cand
        from onnxforge.runtime.bench import bench_interleaved
        from onnxforge.runtime.session import make_session

        t0 = time.perf_counter()
        if s.latency == "cpu":
            from onnxforge.passes.prune.latency import timed

            if s.target != "cpu" or s.threads != 1:
                raise PipelineSpecError("latency=cpu (thread CPU time) needs target cpu and threads=1")
            res = timed({"original": self.model_bytes, "candidate": model_bytes}, self.bench_feeds(),
                        rounds=s.rounds * s.per_round // 3)
            cand.latency_ratio = res["candidate"] / res["original"]
            cand.latency_ms, cand.baseline_latency_ms = res["candidate"], res["original"]
            cand.eval_s += time.perf_counter() - t0
            return cand
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sessions = {
                "original": make_session(self.model_bytes, (s.target,), threads=s.threads, optimize=s.optimize),
                "candidate": make_session(model_bytes, (s.target,), threads=s.threads, optimize=s.optimize),
            }
            results = bench_interleaved(sessions, self.bench_feeds(), rounds=s.rounds, per_round=s.per_round,
                                        warmup=s.warmup)
        orig, cand_r = results["original"], results["candidate"]
        o = np.asarray(orig.times_ms).reshape(s.rounds, s.per_round)
        c = np.asarray(cand_r.times_ms).reshape(s.rounds, s.per_round)
        cand.latency_ratio = float(np.median(np.median(c, axis=1) / np.median(o, axis=1)))
        cand.latency_ms = cand_r.p50_ms
        cand.baseline_latency_ms = orig.p50_ms
        cand.eval_s += time.perf_counter() - t0
        return cand

    # --- all of it ------------------------------------------------------------------------------

    def build_and_score(self, pipeline: str, params: dict[str, Any] | None = None) -> tuple[Candidate, bytes | None]:
        cand = Candidate(pipeline=pipeline, params=dict(params or {}))
        t0 = time.perf_counter()
        try:
            model_bytes = self.build(pipeline)
        except Exception as e:  # a pass refusing these settings is a failed candidate, not a crash
            cand.status = "failed"
            cand.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            cand.build_s = time.perf_counter() - t0
            return cand, None
        cand.build_s = time.perf_counter() - t0
        return self.score(cand, model_bytes), model_bytes

    def evaluate(self, pipeline: str, params: dict[str, Any] | None = None) -> Candidate:
        cand, model_bytes = self.build_and_score(pipeline, params)
        if model_bytes is not None:
            self.time(cand, model_bytes)
        return cand


# ------------------------------------------------------------------ worker processes (pickle-free)

_WORKER: Evaluator | None = None


def init_worker(spec: EvalSpec) -> None:
    global _WORKER
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER = Evaluator(spec)


def worker_build_and_score(pipeline: str, params: dict[str, Any]) -> tuple[Candidate, bytes | None]:
    assert _WORKER is not None, "init_worker was not called"
    return _WORKER.build_and_score(pipeline, params)
