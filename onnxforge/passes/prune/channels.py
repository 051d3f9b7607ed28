"""``prune-channels``: structured (channel / head / hidden-unit) pruning on the ONNX graph."""

from __future__ import annotations

import itertools
import logging
import math
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.ir.io import deep_copy
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.prune import latency, shrink
from onnxforge.passes.prune.dependency import Dependency, Group, analyze
from onnxforge.passes.prune.importance import CRITERIA, class_scores
from onnxforge.passes.registry import register_pass

logger = logging.getLogger(__name__)

Criterion = Literal["l1", "l2", "bn-scale", "activation", "entropy", "reconstruction", "taylor", "random",
                    "sensitivity"]


@register_pass("prune-channels")
class PruneChannelsPass(Pass):
    """Remove whole channels (Conv filters, Gemm/MatMul hidden units, attention heads). Lossy.

    Channels are grouped by :mod:`~onnxforge.passes.prune.dependency` (residual Adds, Concat,
    Split, depthwise convs, Flatten into Gemm, heads), scored by ``criterion`` (see
    :mod:`~onnxforge.passes.prune.importance`), and the lowest-scoring classes of each group are
    removed physically (:mod:`~onnxforge.passes.prune.shrink`): the result is a smaller dense model
    with the same inputs and output shapes.

    Amount: ``ratio`` removes ``floor(ratio * n)`` of the ``n`` channels of every group (at most
    ``max_layer_ratio * n``, always keeping one, and keeping a multiple of ``round_to`` when
    ``round_to > 1``; ``round_to=8`` gives widths that suit onnxruntime's blocked (NCHWc) Conv
    kernels and measured faster than plain pruning at ratio 0.25 on mobilenetv2/yolo-style models
    although it keeps a few more channels — BENCHMARKS.md, Pruning run 3). ``target_flops`` /
    ``target_params`` (fractions to *keep*, e.g. 0.5) instead rank classes globally by group-normalized score ``s / mean(s of its group)`` and remove the
    lowest until the weighted layers' FLOPs (2 * MACs) / the float parameter count fall to the
    target (exact counts, found by bisection on the ranking; ``max_layer_ratio`` caps each group).
    ``round_to=0`` rounds to the NCHWc block of the detected ISA (16 with AVX-512, 8 with AVX2).
    ``target_latency`` (fraction of the measured latency to keep, e.g. 0.6) allocates the cut on
    *measured* latency instead (:mod:`~onnxforge.passes.prune.latency`): each group is timed in
    onnxruntime at candidate widths (multiples of the ISA's block, widths measured slower than a
    wider one dropped) in the real model and shapes (the first calibration feed cut to
    ``latency_batch`` rows, else random inputs of that batch), and the cut goes where latency saved
    per unit of importance lost is largest until the predicted latency reaches the target (and the
    FLOPs ``target_flops`` when that is given too). ``latency_table`` names a JSON file: read when
    it exists (a reproducible build; tests use a hand-made one), else measured and written there.
    ``latency_scope``: ``model`` times the whole model with one group shrunk (exact context, one
    session per width and group), ``layer`` times only the nodes the group's channels flow through
    (its region, in the real shapes) and scales by the whole model's time; ``auto`` picks ``model``
    when that is estimated to take under a minute.
    ``criterion=sensitivity`` ranks channels by l1 within a group and weighs groups by their measured
    output change per channel removed (:mod:`~onnxforge.passes.prune.group_sensitivity`, on the first
    ``sensitivity_samples`` calibration feeds), for the global and latency-aware selections.
    ``protect`` lists node names or op types never touched; channels reaching a graph output
    (the output layer) are never pruned.

    Lossy, with no a-priori bound: removing a channel drops its contribution ``W2[:, c] * a_c`` to
    every consumer. The verifier therefore uses no numeric tolerance (``tolerance = inf``); output
    shapes are preserved and fidelity is reported. Run ``reconstruct`` afterwards to recover.
    """

    lossless = False
    tolerance = math.inf

    def __init__(
        self,
        ratio: float = 0.3,
        criterion: Criterion = "l1",
        target_flops: float | None = None,
        target_params: float | None = None,
        max_layer_ratio: float = 0.9,
        round_to: int = 1,
        protect: list[str] = (),  # type: ignore[assignment]
        target_latency: float | None = None,
        latency_table: str = "",
        latency_rounds: int = 10,
        latency_batch: int = 1,
        latency_scope: Literal["auto", "model", "layer"] = "auto",
        sensitivity_samples: int = 8,
    ):
        super().__init__()
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        for name, t in (("target_flops", target_flops), ("target_params", target_params)):
            if t is not None and not 0.0 < t <= 1.0:
                raise ValueError(f"{name} is the fraction to keep, in (0, 1]; got {t}")
        if target_flops is not None and target_params is not None:
            raise ValueError("give target_flops or target_params, not both")
        if target_latency is not None and not 0.0 < target_latency <= 1.0:
            raise ValueError(f"target_latency is the fraction of the latency to keep, in (0, 1]; got {target_latency}")
        if target_latency is not None and target_params is not None:
            raise ValueError("target_latency combines with target_flops, not target_params")
        if latency_rounds < 1 or latency_batch < 1:
            raise ValueError("latency_rounds and latency_batch must be >= 1")
        if latency_scope not in ("auto", "model", "layer"):
            raise ValueError(f"latency_scope must be auto, model or layer, got {latency_scope!r}")
        if not 0.0 < max_layer_ratio <= 1.0:
            raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
        if round_to < 0:
            raise ValueError(f"round_to must be >= 1 (or 0: the ISA's NCHWc block), got {round_to}")
        self.ratio = ratio
        self.criterion = criterion
        self.target_flops = target_flops
        self.target_params = target_params
        self.max_layer_ratio = max_layer_ratio
        self.round_to = round_to
        self.protect = list(protect)
        self.target_latency = target_latency
        self.latency_table = latency_table
        self.latency_rounds = latency_rounds
        self.latency_batch = latency_batch
        self.latency_scope = latency_scope
        if sensitivity_samples < 1:
            raise ValueError(f"sensitivity_samples must be >= 1, got {sensitivity_samples}")
        self.sensitivity_samples = sensitivity_samples

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        dep = analyze(model, self.protect)
        groups = dep.groups()
        for g in groups:
            if len(g.classes) == 0:
                reasons = sorted(set(g.blocked.values()))
                node = next((s.node for s in g.spaces if s.node is not None), None)
                stats.skip(node if node is not None else g.name, "; ".join(reasons))
        scores, notes = class_scores(dep, self.criterion, self.context, self.context.seed)
        for n in notes:
            stats.note(n)
        weights = None
        if self.criterion == "sensitivity":
            if self.target_latency is None and self.target_flops is None and self.target_params is None:
                # ``ratio`` cuts every group by the same share: there is nothing to weigh between groups.
                stats.note("criterion sensitivity weighs groups only with target_flops/target_params/"
                           "target_latency; with ratio every group is cut alike, in l1 order")
            else:
                weights = self._group_weights(model, dep, groups, scores, stats)
        costs = shrink.Costs(dep)
        if self.target_latency is not None:
            # Widths are already the measured, snapped ones: no rounding afterwards.
            removed = self._select_latency(model, dep, groups, scores, costs, stats, weights)
        else:
            if self.target_flops is not None or self.target_params is not None:
                removed = self._select_global(dep, groups, scores, costs, stats, weights)
            else:
                removed = {g.index: self._select_ratio(g, scores) for g in groups}
            removed = {k: self._round(groups[k], v, scores) for k, v in removed.items()}
        all_removed = set().union(*removed.values()) if removed else set()
        params_before, flops_before = costs.total_params, costs.total_flops
        rows = []
        roots = dep.roots()
        for g in groups:
            gone = removed.get(g.index, set())
            if gone or len(g.classes):
                rows.append({
                    "layers": [s.node.name for s in g.spaces if s.node is not None and not s.filler],
                    "channels": int(len(g.all_classes)),
                    "removed": len(gone),
                    "blocked": sorted(set(g.blocked.values())),
                })
        stats.details["groups"] = rows
        if not all_removed:
            stats.note("nothing to prune at these settings")
            return False
        removed_elem = np.isin(roots, np.fromiter(all_removed, dtype=np.int64))
        params_after, flops_after = costs.after(removed_elem)
        counts = shrink.apply(dep, all_removed)
        for key, n in counts.items():
            stats.count(key, n)
        stats.count("channels_removed", len(all_removed))
        stats.count("groups_pruned", sum(1 for v in removed.values() if v))
        stats.details.update(
            params_before=params_before, params_after=params_after,
            flops_before=flops_before, flops_after=flops_after, criterion=self.criterion,
        )
        logger.info("prune-channels: removed %d channel classes; params %d -> %d, FLOPs %d -> %d",
                    len(all_removed), params_before, params_after, flops_before, flops_after)
        return True

    # --- selection -------------------------------------------------------------------------------

    def _cap(self, g: Group) -> int:
        n = len(g.all_classes)
        return max(0, min(int(math.floor(self.max_layer_ratio * n)), len(g.classes), n - 1))

    def _select_ratio(self, g: Group, scores: dict[int, float]) -> set[int]:
        n = min(int(math.floor(self.ratio * len(g.all_classes) + 1e-9)), self._cap(g))
        if n <= 0:
            return set()
        order = sorted(g.classes.tolist(), key=lambda r: (scores.get(r, 0.0), r))
        return set(order[:n])

    def _round(self, g: Group, gone: set[int], scores: dict[int, float]) -> set[int]:
        """Un-prune the best removed classes until the kept count is a multiple of ``round_to``."""
        round_to = self.round_to or latency.preferred_block()
        if round_to <= 1 or g.unit_size != 1 or not gone:
            return gone
        n = len(g.all_classes)
        keep = n - len(gone)
        target_keep = min(n, int(math.ceil(keep / round_to)) * round_to)
        give_back = target_keep - keep
        if give_back <= 0:
            return gone
        order = sorted(gone, key=lambda r: (scores.get(r, 0.0), r), reverse=True)
        return gone - set(order[:give_back])

    def _group_weights(self, model: ir.Model, dep: Dependency, groups: list[Group], scores: dict[int, float],
                       stats: PassStats) -> dict[int, float]:
        """Measured loss per channel of each group (:mod:`.group_sensitivity`), floored at 1e-3 of the
        median so that no group is free."""
        from onnxforge.errors import CalibrationDataError
        from onnxforge.passes.prune.group_sensitivity import group_weights

        data = self.context.calibration_data
        if data is None:
            raise CalibrationDataError("prune-channels(criterion=sensitivity) needs calibration data: it measures "
                                       "each group's effect on the outputs")
        feeds = list(itertools.islice(data, self.sensitivity_samples))
        weights, raw = group_weights(model, dep, groups, scores, feeds,
                                     providers=tuple(self.context.providers))
        weights = {gi: max(w, 1e-3) for gi, w in weights.items()}
        stats.details["group_sensitivity"] = {latency.group_key(groups[gi]): {"weight": weights[gi], "error": raw[gi]}
                                              for gi in weights}
        stats.count("groups_measured", len(weights))
        return weights

    def _select_global(self, dep: Dependency, groups: list[Group], scores: dict[int, float],
                       costs: shrink.Costs, stats: PassStats,
                       weights: dict[int, float] | None = None) -> dict[int, set[int]]:
        candidates = []
        for g in groups:
            vals = [scores.get(r, 0.0) for r in g.all_classes.tolist()]
            mean = float(np.mean(vals)) if vals else 0.0
            w = 1.0 if weights is None else weights.get(g.index, 1.0)
            for r in g.classes.tolist():
                candidates.append((w * scores.get(r, 0.0) / mean if mean > 0 else 0.0, r, g.index))
        candidates.sort()
        caps = {g.index: self._cap(g) for g in groups}
        taken = {g.index: 0 for g in groups}
        sequence = []
        for _, r, gi in candidates:
            if taken[gi] < caps[gi]:
                taken[gi] += 1
                sequence.append((r, gi))
        roots = dep.roots()
        use_flops = self.target_flops is not None
        total = costs.total_flops if use_flops else costs.total_params
        target = (self.target_flops if use_flops else self.target_params) * total

        def metric(k: int) -> int:
            removed = np.isin(roots, np.array([r for r, _ in sequence[:k]], dtype=np.int64))
            p, f = costs.after(removed)
            return f if use_flops else p

        lo, hi = 0, len(sequence)
        if metric(hi) > target:
            stats.note(f"target not reachable: pruning every prunable channel leaves {metric(hi) / max(total, 1):.3f}")
            lo = hi
        while lo < hi:
            mid = (lo + hi) // 2
            if metric(mid) <= target:
                hi = mid
            else:
                lo = mid + 1
        chosen: dict[int, set[int]] = {g.index: set() for g in groups}
        for r, gi in sequence[:lo]:
            chosen[gi].add(r)
        return chosen

    def _select_latency(self, model: ir.Model, dep: Dependency, groups: list[Group], scores: dict[int, float],
                        costs: shrink.Costs, stats: PassStats,
                        weights: dict[int, float] | None = None) -> dict[int, set[int]]:
        table = self._latency_table(model, dep, groups, stats)
        caps = {g.index: self._cap(g) for g in groups}
        flops_ok = None
        if self.target_flops is not None:
            roots = dep.roots()
            target = self.target_flops * costs.total_flops

            def flops_ok(removed: dict[int, list[int]]) -> bool:
                gone = [r for rs in removed.values() for r in rs]
                return costs.after(np.isin(roots, np.array(gone, dtype=np.int64)))[1] <= target

        alloc = latency.allocate(groups, scores, table, self.target_latency, caps, flops_ok=flops_ok,
                                 group_weight=weights)
        if not alloc.reached:
            stats.note(f"target_latency={self.target_latency} not reachable with the measured widths: "
                       f"predicted latency ratio {alloc.predicted:.3f}")
        stats.details["latency"] = {
            "predicted_ratio": alloc.predicted, "reached": alloc.reached, "block": table.block,
            "widths": {latency.group_key(groups[gi]): w for gi, w in alloc.widths.items()
                       if w < len(groups[gi].all_classes)},
            "steps": alloc.steps, "table": self.latency_table or None,
        }
        return {g.index: set(alloc.removed.get(g.index, [])) for g in groups}

    def _model_scope_seconds(self, model: ir.Model, feeds, widths: dict[int, list[int]]) -> float:
        """Estimated time of whole-model measurement: one quick timing times the runs it needs."""
        import warnings

        from onnxforge.runtime.bench import bench

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = bench(model, feeds, warmup=1, repeat=3, threads=1, providers=tuple(self.context.providers)).min_ms
        runs = sum(len(w) + 1 for w in widths.values()) * (3 * self.latency_rounds + 3)
        return t * runs / 1e3

    def _latency_table(self, model: ir.Model, dep: Dependency, groups: list[Group],
                       stats: PassStats) -> latency.LatencyTable:
        import os

        if self.latency_table and os.path.exists(self.latency_table):
            table = latency.LatencyTable.load(self.latency_table)
            missing = [latency.group_key(g) for g in groups if len(g.classes) and latency.group_key(g) not in table.groups]
            if missing:
                stats.note(f"latency table has no row for {len(missing)} prunable group(s); they stay at full width")
            return table
        block = latency.preferred_block()
        widths = {}
        for g in groups:
            if len(g.classes) == 0:
                continue
            n = len(g.all_classes)
            widths[g.index] = latency.candidate_widths(n, n - self._cap(g), block if g.unit_size == 1 else 1)
        feeds = self._latency_feeds(model)
        scope = self.latency_scope
        if scope == "auto":
            scope = "model" if self._model_scope_seconds(model, feeds, widths) <= 60.0 else "layer"
        if scope == "layer":
            notes: list[str] = []
            table = latency.measure_layers(
                model, dep, widths, groups, feeds, analyze=lambda m: analyze(m, self.protect),
                shrink_apply=shrink.apply, rounds=self.latency_rounds, providers=tuple(self.context.providers),
                block=block, notes=notes)
            for n in notes:
                stats.note(n)
            stats.count("latency_variants_timed", sum(len(table.groups.get(latency.group_key(g), {})) for g in groups))
            if self.latency_table:
                table.save(self.latency_table)
            return table

        def shrink_copy(gi: int, width: int) -> ir.Model:
            copy = deep_copy(model)
            dep_c = analyze(copy, self.protect)
            g_c = dep_c.groups()[gi]
            assert latency.group_key(g_c) == latency.group_key(groups[gi]), "dependency analysis is not deterministic"
            cut = len(g_c.all_classes) - width
            shrink.apply(dep_c, set(g_c.classes.tolist()[:cut]))
            return copy

        table = latency.measure_model(model, widths, shrink_copy, groups, feeds, rounds=self.latency_rounds,
                                      providers=tuple(self.context.providers), block=block)
        stats.count("latency_variants_timed", sum(len(w) for w in widths.values()))
        if self.latency_table:
            table.save(self.latency_table)
        return table

    def _latency_feeds(self, model: ir.Model) -> dict[str, np.ndarray] | None:
        """The first calibration feed cut to ``latency_batch`` rows (the user's real shapes), else
        random inputs of that batch size."""
        data = self.context.calibration_data
        if data is not None:
            for feed in data:
                return {k: np.asarray(v)[: self.latency_batch] for k, v in feed.items()}
        from onnxforge.runtime.data import random_feeds
        from onnxforge.runtime._model import session_input_specs
        from onnxforge.runtime.session import make_session

        info = make_session(model, optimize="disable")
        return random_feeds(session_input_specs(info.session), seed=self.context.seed, batch_size=self.latency_batch)
