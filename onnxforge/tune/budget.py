"""Tune's own metric as ``quantize-int8``'s accuracy budget (mixed-precision int8 candidates).

A candidate that runs ``quantize-int8(max_drop=B)`` keeps float the cheapest set of weighted nodes whose
int8 error breaks ``B`` (:mod:`onnxforge.passes.quantize.fallback`). Left alone, the pass measures
``B`` in a proxy unit (expected top-1 flips, or ``1 - cosine``) on its calibration samples. Inside
``tune`` it measures tune's own metric instead, on the data tune searches with:

* ``options["metric"]`` = :class:`PassMetric`: the pass's ``metric(outputs_per_feed, feeds)``
  computed as tune computes it, ``s * f(candidate, original_outputs, data)`` on the samples the feeds
  cover, with ``s = +1`` for a metric where higher is better and ``-1`` for ``max-abs``;
* ``options["eval_data"]`` = the search data as feeds (:func:`search_feeds`); never the unseen split,
  which tune never receives.

**Units.** The pass's drop is ``metric(float model) - metric(int8 model)``, so ``B`` is in tune's
unit: points for ``top1`` and for a task metric that returns points, ``1 - cos`` for ``cosine``, the
absolute error for ``max-abs`` (the float model before the pass is O1's lossless rewrite of the
original, so its own drop is ~0). ``B = tune --max-drop`` held on the search data as a point
estimate is too optimistic: the float set is fitted to those samples and the chosen model is judged
on inputs nobody saw (the trained YOLOX detector, 200 search images: 0.90 points there, 1.47 on 200
unseen). The default space's mixed-precision candidate therefore holds the whole ``--max-drop`` for an
upper 90 % confidence bound (``budget_confidence``, :mod:`onnxforge.passes.quantize.fallback`): on
that detector 1.78x faster at -0.88 points unseen (200 search images), and all float on 32, where half
the budget as a fixed margin had lost 1.95 points unseen (BENCHMARKS.md, Tune runs 4-5).

**Reproducible.** The pass's decisions are measured once per candidate and written to a decision
record (``options["decisions"]``, :func:`record_path`, in tune's cache); the chosen model is rebuilt
by replaying it, and the saved config names a copy of it, so ``onnxforge optimize --config``
rebuilds the same bytes without tune's metric.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from onnxforge.passes.spec import PassSpec
    from onnxforge.tune.evaluate import Evaluator

#: ``quantize-int8``'s ``budget_confidence`` in the default space's mixed-precision candidate.
BUDGET_CONFIDENCE = 0.9
#: The search data goes to the pass in at least this many feeds (smaller batches), for that bound.
MIN_FEEDS = 20

PASS = "quantize-int8"


def pass_budget(max_drop: float) -> dict[str, float]:
    """The default space's ``quantize-int8`` budget options for tune's ``--max-drop`` (same unit): the
    whole of it, held at ``BUDGET_CONFIDENCE``."""
    return {"max_drop": float(max_drop), "budget_confidence": BUDGET_CONFIDENCE}


def budgeted(specs: list["PassSpec"]) -> bool:
    """Whether the pipeline runs ``quantize-int8`` with an accuracy budget in tune's metric (and so
    needs the metric): not with ``budget_measure=proxy`` (O3's int8 as the preset builds it)."""
    return any(s.name == PASS and s.options.get("max_drop") is not None
               and s.options.get("budget_measure", "auto") == "auto" for s in specs)


def search_feeds(evaluator: "Evaluator", min_feeds: int = 1) -> tuple[list[dict[str, np.ndarray]], dict[int, int]]:
    """The search data as the pass's feeds, batched as the evaluator runs it (the model's fixed batch,
    else ``eval_batch``, smaller if that gives fewer than ``min_feeds`` feeds), and the number of real
    samples in each feed (by ``id``: a fixed-batch model's last feed is padded by repeating its last
    sample, as :meth:`Evaluator.run` does)."""
    from onnxforge.ir.io import load

    model = load(evaluator.model_bytes)
    first = next(v for v in model.graph.inputs if v.name in evaluator.input_names)
    dim0 = first.shape[0] if first.shape is not None and len(first.shape) else None
    fixed = dim0 if isinstance(dim0, int) else None
    step = fixed or max(1, min(evaluator.settings.eval_batch, -(-evaluator.n // max(1, min_feeds))))
    feeds: list[dict[str, np.ndarray]] = []
    counts: dict[int, int] = {}
    for lo in range(0, evaluator.n, step):
        hi = min(lo + step, evaluator.n)
        feed = {}
        for name in evaluator.input_names:
            arr = evaluator.data[name][lo:hi]
            if fixed and hi - lo < fixed:
                arr = np.concatenate([arr, np.repeat(arr[-1:], fixed - (hi - lo), axis=0)])
            feed[name] = arr
        feeds.append(feed)
        counts[id(feed)] = hi - lo
    return feeds, counts


class PassMetric:
    """``metric(outputs_per_feed, feeds) -> float`` for ``quantize-int8``: tune's metric, higher is better.

    ``outputs_per_feed[i]`` are the model's outputs on ``feeds[i]`` in graph-output order; the feeds
    are some of :func:`search_feeds` (a prefix when the pass ranks on its first few, one at a time when
    it estimates the drop's standard error), compared with the original model's outputs on the samples
    they cover. ``starts`` (by ``id``) says where each feed's samples begin in the search data; without
    it the feeds are taken as a prefix.
    """

    def __init__(self, evaluator: "Evaluator", counts: dict[int, int], starts: dict[int, int] | None = None):
        from onnxforge.ir.io import load

        self.evaluator = evaluator
        self.counts = counts
        self.starts = starts
        self.names = [v.name for v in load(evaluator.model_bytes).graph.outputs]
        self.sign = 1.0 if evaluator.metric.higher_is_better else -1.0

    def __call__(self, outputs_per_feed: list[list[np.ndarray]], feeds: list[dict[str, np.ndarray]]) -> float:
        from onnxforge.errors import OnnxforgeError

        if len(outputs_per_feed) != len(feeds) or not feeds:
            raise OnnxforgeError("tune's metric in quantize-int8: outputs and feeds disagree")
        real = [self.counts.get(id(f)) for f in feeds]
        if any(r is None for r in real):
            raise OnnxforgeError("tune's metric in quantize-int8 was given feeds that are not tune's search data")
        if any(len(outs) != len(self.names) for outs in outputs_per_feed):
            raise OnnxforgeError(f"tune's metric in quantize-int8: the model must keep its {len(self.names)} outputs")
        if self.starts is None:
            rows = np.arange(int(sum(real)))  # type: ignore[arg-type]
        else:
            rows = np.concatenate([np.arange(self.starts[id(f)], self.starts[id(f)] + r) for f, r in zip(feeds, real)])
        # outputs by name (the one comparator pairs by name), samples concatenated, padding dropped
        axes = self.evaluator.batch_axes  # samples on axis 0, as the evaluator gives the original's
        cand = {name: np.concatenate([np.moveaxis(np.asarray(outs[j]), axes.get(name, 0), 0)[:r]
                                      for outs, r in zip(outputs_per_feed, real)])
                for j, name in enumerate(self.names)}
        orig = {name: v[rows] for name, v in self.evaluator.original_outputs().items()}
        data = {name: v[rows] for name, v in self.evaluator.data.items()}
        return self.sign * float(self.evaluator.metric.fn(cand, orig, data))


def context_options(evaluator: "Evaluator", specs: list["PassSpec"], pipeline: str) -> dict[str, Any]:
    """The :class:`~onnxforge.passes.base.PassContext` options that wire tune's metric into the
    budgeted ``quantize-int8`` of ``specs`` (empty when it has none): ``metric``, ``eval_data`` and,
    with a decisions folder, ``decisions`` (:func:`record_path`)."""
    if not budgeted(specs):
        return {}
    # the drop's standard error (budget_confidence) is taken over feeds: at least MIN_FEEDS of them
    feeds, counts = search_feeds(evaluator, MIN_FEEDS)
    starts = dict(zip((id(f) for f in feeds), np.cumsum([0] + [counts[id(f)] for f in feeds[:-1]]).tolist()))
    options: dict[str, Any] = {"metric": PassMetric(evaluator, counts, starts), "eval_data": feeds}
    folder = evaluator.spec.decisions_dir
    if folder:
        options["decisions"] = str(record_path(folder, evaluator, pipeline))
    return options


def record_path(folder: str | pathlib.Path, evaluator: "Evaluator", pipeline: str) -> pathlib.Path:
    """Where the decision record of ``pipeline`` goes: one per model, search and calibration data,
    settings and pipeline (the pass checks a record's model and options, not the data it was measured
    on, so the data is in the name)."""
    from onnxforge.tune.cache import hash_arrays, hash_source

    s = evaluator.settings
    key = "|".join([evaluator.model_sha256, hash_arrays(evaluator.data), hash_source(evaluator.spec.calibration),
                    s.metric, s.target, str(s.seed), str(s.num_samples), pipeline])
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"quantize-decisions-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
