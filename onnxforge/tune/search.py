"""The search: grid or Optuna, evaluations in worker processes, the Pareto front and the choice.

Strategies:

- ``grid``: every candidate of the space (:meth:`Space.grid`), in a fixed order; when the grid is
  larger than the budget, a seeded sample of ``budget`` of them (the base pipeline and the space's
  ``first_candidates`` always included, budget allowing).
- ``optuna``: Optuna's multi-objective TPE sampler (``sampler="tpe"``) or NSGA-II
  (``sampler="nsga2"``), seeded, minimizing (latency ratio, metric drop) under the constraint
  ``drop <= max_drop``, so the search spends its budget near the feasible fast corner while still
  mapping the trade-off. The base pipeline (every lossy pass off) is the first trial, so there is
  always a feasible fallback; the space's ``first_candidates`` (the default space: O3's int8) come
  next. The sampler proposes; each distinct pipeline is evaluated once (a
  repeat proposal is answered from memory and does not count against the budget).

``budget`` counts distinct candidates, cached or not; ``evaluations`` counts the ones actually built
in this run (a resumed, finished run has 0).

Parallelism: with ``jobs > 1`` candidates are built and scored in worker processes (``executor``
``local``: a spawn-context process pool; ``ray``: Ray tasks on a local instance, or the cluster in
``RAY_ADDRESS``). Latency is always measured in this process, one candidate at a time, interleaved
with the original: concurrent workers would otherwise disturb each other's timings. For ``grid`` the
set of results does not depend on ``jobs`` (results are ordered by submission); for ``optuna`` with
``jobs > 1`` the sampler sees results in completion order, so runs differ.

Choice: the fastest candidate (lowest latency ratio) whose drop is within ``max_drop``; or, with
``max_latency_ms``, the best metric among candidates at or under that latency (``latency="bench"``
only). Before choosing, the ``refine`` fastest feasible candidates are timed once more, together
with the original in one interleaved run with twice the rounds, to keep a lucky measurement from
winning.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import random
from typing import Any, Callable

from onnxforge.errors import MissingDependencyError, PipelineSpecError
from onnxforge.tune.cache import Cache
from onnxforge.tune.evaluate import Candidate, EvalSpec, Evaluator, init_worker, worker_build_and_score
from onnxforge.tune.space import NONE, Space

logger = logging.getLogger(__name__)

STRATEGIES = ("optuna", "grid")
SAMPLERS = ("tpe", "nsga2")
EXECUTORS = ("local", "ray")


@dataclasses.dataclass
class TuneResult:
    candidates: list[Candidate]
    front: list[Candidate]
    chosen: Candidate | None
    evaluations: int
    cache_hits: int
    interrupted: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


def pareto_front(cands: list[Candidate]) -> list[Candidate]:
    """Non-dominated ``ok`` candidates on (latency ratio, drop), both minimized; sorted by latency.

    A candidate is dominated when another is at least as good on both and better on one. Ties on
    both values keep the first by pipeline string, so the front is a deterministic function of the
    results.
    """
    pts = [c for c in cands if c.ok and c.latency_ratio is not None and c.drop is not None]
    pts.sort(key=lambda c: (c.latency_ratio, c.drop, c.pipeline))
    front: list[Candidate] = []
    best_drop = float("inf")
    for c in pts:
        if c.drop < best_drop - 1e-12:
            front.append(c)
            best_drop = c.drop
    return front


def choose(cands: list[Candidate], max_drop: float | None, max_latency_ms: float | None) -> Candidate | None:
    ok = [c for c in cands if c.ok and c.latency_ratio is not None]
    if max_latency_ms is not None:
        under = [c for c in ok if c.latency_ms is not None and c.latency_ms <= max_latency_ms]
        if max_drop is not None:
            under = [c for c in under if c.within(max_drop)]
        return min(under, key=lambda c: (c.drop, c.latency_ratio, c.pipeline), default=None)
    within = [c for c in ok if c.within(max_drop)]
    return min(within, key=lambda c: (c.latency_ratio, c.drop, c.pipeline), default=None)


# --------------------------------------------------------------------------------- executors


class _Inline:
    """Runs in this process (``jobs=1``): a future that is done at submission."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def submit(self, pipeline: str, params: dict[str, Any]) -> cf.Future:
        f: cf.Future = cf.Future()
        try:
            f.set_result(self.evaluator.build_and_score(pipeline, params))
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            if isinstance(e, KeyboardInterrupt):
                raise
            f.set_exception(e)
        return f

    def shutdown(self) -> None:
        pass


class _Pool:
    def __init__(self, spec: EvalSpec, jobs: int):
        import multiprocessing as mp

        self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                           initializer=init_worker, initargs=(spec,))

    def submit(self, pipeline: str, params: dict[str, Any]) -> cf.Future:
        return self.pool.submit(worker_build_and_score, pipeline, params)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_RAY_EVALUATORS: dict[str, Evaluator] = {}


def _ray_build_and_score(spec: EvalSpec, pipeline: str, params: dict[str, Any]):
    from onnxforge.tune.evaluate import sha256

    key = sha256(spec.model_bytes) + repr(spec.settings)
    if key not in _RAY_EVALUATORS:
        _RAY_EVALUATORS[key] = Evaluator(spec)
    return _RAY_EVALUATORS[key].build_and_score(pipeline, params)


class _Ray:
    """Ray tasks; starts a local instance unless one is running or ``RAY_ADDRESS`` names a cluster."""

    def __init__(self, spec: EvalSpec, jobs: int):
        try:
            import ray
        except ImportError as e:
            raise MissingDependencyError(
                "--executor ray needs Ray: pip install 'onnxforge[ray]' (or pip install ray)"
            ) from e
        import os

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "ignore_reinit_error": True}
            if not address:
                kwargs["num_cpus"] = max(1, jobs)
            ray.init(address=address or None, **kwargs)
            self.started = True
        self.task = ray.remote(num_cpus=1)(_ray_build_and_score)
        self.spec_ref = ray.put(spec)

    def submit(self, pipeline: str, params: dict[str, Any]) -> cf.Future:
        return self.task.remote(self.spec_ref, pipeline, params).future()

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, jobs: int, spec: EvalSpec, evaluator: Evaluator):
    if kind not in EXECUTORS:
        raise PipelineSpecError(f"unknown executor {kind!r}; choose {', '.join(EXECUTORS)}")
    if kind == "ray":
        return _Ray(spec, jobs)
    if jobs <= 1:
        return _Inline(evaluator)
    return _Pool(spec, jobs)


# ------------------------------------------------------------------------------------ proposers


class _GridProposer:
    def __init__(self, space: Space, budget: int, seed: int, notes: list[str]):
        grid = space.grid()
        if len(grid) > budget:
            base = grid[0]
            wanted = {space.pipeline(p) for p in space.first_candidates}
            first = [p for p in grid[1:] if space.pipeline(p) in wanted]
            rest = [p for p in grid[1:] if space.pipeline(p) not in wanted]
            random.Random(seed).shuffle(rest)
            picked = ([base] + first + rest)[: max(1, budget)]
            order = {space.pipeline(p): i for i, p in enumerate(grid)}
            picked.sort(key=lambda p: order[space.pipeline(p)])
            notes.append(f"grid has {len(grid)} candidates, budget {budget}: evaluating a seeded sample")
            grid = picked
        self.queue = list(grid)

    def ask(self) -> tuple[Any, dict[str, Any]] | None:
        return (None, self.queue.pop(0)) if self.queue else None

    def tell(self, handle: Any, cand: Candidate) -> None:
        pass


class _OptunaProposer:
    def __init__(self, space: Space, seed: int, sampler: str, max_drop: float | None, budget: int):
        try:
            import optuna
        except ImportError as e:
            raise MissingDependencyError("--strategy optuna needs Optuna: pip install optuna") from e
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.space = space
        self.max_drop = max_drop

        # Constraints go on each trial (Trial.set_constraint, Optuna >= 5); older Optuna takes a
        # constraints_func on the sampler.
        self.trial_constraints = hasattr(optuna.trial.Trial, "set_constraint")
        kwargs: dict[str, Any] = {}
        if max_drop is not None and not self.trial_constraints:
            kwargs["constraints_func"] = lambda t: [float(t.user_attrs.get("violation", 0.0))]
        if sampler == "nsga2":
            pop = max(4, min(20, budget // 4))
            s = optuna.samplers.NSGAIISampler(seed=seed, population_size=pop, **kwargs)
        elif sampler == "tpe":
            s = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                           n_startup_trials=max(4, min(10, budget // 4)), **kwargs)
        else:
            raise PipelineSpecError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
        self.study = optuna.create_study(directions=["minimize", "minimize"], sampler=s)
        base: dict[str, Any] = {}
        for group in space.groups():
            base[f"exclusive:{group}"] = NONE
        for slot in space.slots:
            if slot.optional and not slot.exclusive and not slot.requires:
                base[slot.key] = False
        if base:
            self.study.enqueue_trial(base)
        for params in space.first_candidates[: max(0, budget - 1)]:
            self.study.enqueue_trial(params)
        self.size = space.size()

    def ask(self) -> tuple[Any, dict[str, Any]] | None:
        trial = self.study.ask()
        return trial, self.space.suggest(trial)

    def tell(self, trial: Any, cand: Candidate) -> None:
        optuna = self.optuna
        if cand.status == "failed" or cand.drop is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        violation = (cand.drop - self.max_drop) if self.max_drop is not None else 0.0
        trial.set_user_attr("violation", float(violation))
        if self.max_drop is not None and self.trial_constraints:
            trial.set_constraint("drop", float(violation))
        latency = cand.latency_ratio if cand.latency_ratio is not None else 1.0  # early-stop: not timed
        self.study.tell(trial, [float(latency), float(cand.drop)])


# --------------------------------------------------------------------------------------- tuner


class Tuner:
    """Runs the search. ``on_result(candidate, result_so_far_best)`` is called after each candidate."""

    def __init__(
        self,
        space: Space,
        spec: EvalSpec,
        *,
        cache: Cache | None = None,
        strategy: str = "optuna",
        sampler: str = "tpe",
        budget: int = 40,
        seed: int = 0,
        jobs: int = 1,
        executor: str = "local",
        max_drop: float | None = 1.0,
        max_latency_ms: float | None = None,
        refine: int = 3,
        on_result: Callable[[Candidate, Candidate | None], None] | None = None,
        evaluator: Evaluator | None = None,
    ):
        if strategy not in STRATEGIES:
            raise PipelineSpecError(f"unknown strategy {strategy!r}; choose {', '.join(STRATEGIES)}")
        if budget < 1:
            raise PipelineSpecError("--budget must be at least 1")
        if max_latency_ms is not None and spec.settings.latency not in ("bench", "cpu"):
            raise PipelineSpecError("--max-latency-ms needs measured latency (latency mode 'bench')")
        self.space, self.spec = space, spec
        self.evaluator = evaluator or Evaluator(spec)
        self.cache = cache
        self.strategy, self.sampler, self.budget, self.seed = strategy, sampler, budget, seed
        self.jobs, self.executor = max(1, jobs), executor
        self.max_drop, self.max_latency_ms = max_drop, max_latency_ms
        self.refine = refine
        self.on_result = on_result
        self.candidates: list[Candidate] = []
        self.evaluations = 0
        self.notes: list[str] = list(space.notes)

    def _best(self) -> Candidate | None:
        return choose(self.candidates, self.max_drop, self.max_latency_ms)

    def _record(self, cand: Candidate) -> None:
        self.candidates.append(cand)
        if self.on_result:
            self.on_result(cand, self._best())

    def run(self) -> TuneResult:
        if self.strategy == "grid":
            proposer: Any = _GridProposer(self.space, self.budget, self.seed, self.notes)
        else:
            proposer = _OptunaProposer(self.space, self.seed, self.sampler, self.max_drop, self.budget)
        size = self.space.size()
        max_asks = self.budget * 20 + 50
        by_pipeline: dict[str, Candidate] = {}
        pending: dict[cf.Future, tuple[Any, str, dict[str, Any], int]] = {}
        executor = None
        interrupted = False
        asks = 0
        next_index = 0
        exhausted = False
        try:
            while True:
                # Propose until the workers are busy or the budget is spoken for.
                while (not exhausted and len(pending) < self.jobs
                       and len(by_pipeline) + len(pending) < self.budget and asks < max_asks):
                    asked = proposer.ask()
                    asks += 1
                    if asked is None:
                        exhausted = True
                        break
                    handle, params = asked
                    pipeline = self.space.pipeline(params)
                    if pipeline in by_pipeline:
                        proposer.tell(handle, by_pipeline[pipeline])
                        if size is not None and len(by_pipeline) >= size:
                            exhausted = True
                        continue
                    if any(p == pipeline for _, p, _, _ in pending.values()):
                        if hasattr(proposer, "study"):
                            proposer.study.tell(handle, state=proposer.optuna.trial.TrialState.FAIL)
                        continue
                    cached = self.cache.get(pipeline, self.max_drop) if self.cache else None
                    if cached is not None:
                        cached.params = params
                        cached.index = next_index
                        next_index += 1
                        by_pipeline[pipeline] = cached
                        self._record(cached)
                        proposer.tell(handle, cached)
                        continue
                    if executor is None:
                        executor = make_executor(self.executor, self.jobs, self.spec, self.evaluator)
                    future = executor.submit(pipeline, params)
                    pending[future] = (handle, pipeline, params, next_index)
                    next_index += 1
                    self.evaluations += 1
                if not pending:
                    break
                done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: pending[f][3]):
                    handle, pipeline, params, index = pending.pop(future)
                    try:
                        cand, model_bytes = future.result()
                    except Exception as e:  # a worker crash is a failed candidate
                        cand, model_bytes = Candidate(pipeline, params, status="failed",
                                                      error=f"{type(e).__name__}: {e}"), None
                    cand.params, cand.index = params, index
                    if model_bytes is not None:
                        self.evaluator.time(cand, model_bytes)
                    if self.cache is not None and cand.status != "failed":
                        self.cache.put(cand, self.max_drop)
                    by_pipeline[pipeline] = cand
                    self._record(cand)
                    proposer.tell(handle, cand)
        except KeyboardInterrupt:
            interrupted = True
            self.notes.append("interrupted: finished candidates kept (and cached); rerun to resume")
        finally:
            if executor is not None:
                executor.shutdown()
        self.candidates.sort(key=lambda c: c.index)
        if not interrupted and self.refine and self.spec.settings.latency in ("bench", "cpu"):
            try:
                self._refine()
            except KeyboardInterrupt:
                interrupted = True
        front = pareto_front(self.candidates)
        return TuneResult(self.candidates, front, self._best(), self.evaluations,
                          self.cache.hits if self.cache else 0, interrupted, self.notes)

    def _refine(self) -> None:
        """Re-time the fastest feasible candidates together with the original (one interleaved run)."""
        import numpy as np

        from onnxforge.tune.evaluate import sha256

        from onnxforge.runtime.bench import bench_interleaved
        from onnxforge.runtime.session import make_session

        feasible = [c for c in self.candidates if c.ok and c.latency_ratio is not None
                    and c.within(self.max_drop)]
        feasible.sort(key=lambda c: (c.latency_ratio, c.drop, c.pipeline))
        top = feasible[: self.refine]
        if len(top) < 2:
            return
        s = self.spec.settings
        ev = self.evaluator
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sessions = {"original": make_session(ev.model_bytes, (s.target,), threads=s.threads,
                                                 optimize=s.optimize)}
            kept = []
            for c in top:
                built = ev.build(c.pipeline)
                if c.model_sha256 and sha256(built) != c.model_sha256:
                    # a cached result of another build of this pipeline (an older onnxforge): timing this
                    # one would pair its latency with the other's metric
                    self.notes.append(f"not re-timed: {c.pipeline} builds a different model than the one "
                                      "measured (cached by another onnxforge version?); clear the cache to re-measure it")
                    continue
                sessions[f"c{len(kept)}"] = make_session(built, (s.target,), threads=s.threads, optimize=s.optimize)
                kept.append(c)
            top = kept
            if not top:
                return
            rounds = 2 * s.rounds
            results = bench_interleaved(sessions, ev.bench_feeds(), rounds=rounds, per_round=s.per_round,
                                        warmup=s.warmup)
        o = np.median(np.asarray(results["original"].times_ms).reshape(rounds, s.per_round), axis=1)
        for i, c in enumerate(top):
            t = np.median(np.asarray(results[f"c{i}"].times_ms).reshape(rounds, s.per_round), axis=1)
            c.latency_ratio = float(np.median(t / o))
            c.latency_ms = results[f"c{i}"].p50_ms
            c.baseline_latency_ms = results["original"].p50_ms
        self.notes.append(f"re-timed the {len(top)} fastest feasible candidates together ({rounds} rounds)")
