"""``prune-channels``: structured (channel / head / hidden-unit) pruning on the ONNX graph."""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.prune import shrink
from onnxforge.passes.prune.dependency import Dependency, Group, analyze
from onnxforge.passes.prune.importance import CRITERIA, class_scores
from onnxforge.passes.registry import register_pass

logger = logging.getLogger(__name__)

Criterion = Literal["l1", "l2", "bn-scale", "activation", "entropy", "taylor", "random"]


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
        if not 0.0 < max_layer_ratio <= 1.0:
            raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.ratio = ratio
        self.criterion = criterion
        self.target_flops = target_flops
        self.target_params = target_params
        self.max_layer_ratio = max_layer_ratio
        self.round_to = round_to
        self.protect = list(protect)

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
        costs = shrink.Costs(dep)
        if self.target_flops is not None or self.target_params is not None:
            removed = self._select_global(dep, groups, scores, costs, stats)
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
        if self.round_to <= 1 or g.unit_size != 1 or not gone:
            return gone
        n = len(g.all_classes)
        keep = n - len(gone)
        target_keep = min(n, int(math.ceil(keep / self.round_to)) * self.round_to)
        give_back = target_keep - keep
        if give_back <= 0:
            return gone
        order = sorted(gone, key=lambda r: (scores.get(r, 0.0), r), reverse=True)
        return gone - set(order[:give_back])

    def _select_global(self, dep: Dependency, groups: list[Group], scores: dict[int, float],
                       costs: shrink.Costs, stats: PassStats) -> dict[int, set[int]]:
        candidates = []
        for g in groups:
            vals = [scores.get(r, 0.0) for r in g.all_classes.tolist()]
            mean = float(np.mean(vals)) if vals else 0.0
            for r in g.classes.tolist():
                candidates.append((scores.get(r, 0.0) / mean if mean > 0 else 0.0, r, g.index))
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
