"""Importance criteria for channel pruning: a score per channel class (higher = keep).

Each criterion first gives a score to every *position* of some tensors coupled to a group (a weight
slice, a BN scale, an activation channel); the scores of one tensor are normalized by their mean,
so tensors of different scale weigh alike, and the *class score* is the sum of the normalized scores
of all its elements over all coupled tensors (Torch-Pruning's group importance, sum reduction):

    score(class) = sum_{tensor t} sum_{p in t: elem(p) in class} s_t(p) / mean_p s_t(p)

Criteria (``s_t(p)`` for output channel ``p`` of weight ``W``):

* ``l1``: ``sum |W[p]|``; ``l2``: ``sqrt(sum W[p]^2)`` -- slice norms of every coupled weight: the
  producing filters (``W[p, ...]``), the consumers' input columns (``W2[:, p, ...]``), depthwise
  filters and BatchNorm scales (a filter's own norm means little when a BatchNorm rescales it);
* ``bn-scale``: ``|gamma[p]|`` of the following BatchNorm (network slimming); groups without a
  BatchNorm fall back to ``l1``;
* ``activation``: mean ``|x[:, p]|`` on the calibration data, for every tensor a pruned channel
  enters a Conv/Gemm/MatMul through;
* ``entropy``: entropy (bits) of a 32-bin histogram of ``x[:, p]`` on the calibration data;
* ``reconstruction``: the squared error each consumer's output takes when channel ``p`` of its
  input is zeroed, ``E[x_p^2] * ||W2[:, p]||^2`` (ThiNet / output-error importance, the diagonal
  of the least-squares error: cross terms between channels are left out), on the calibration data;
* ``taylor``: ``sum |w * dL/dw|`` over the slice, from ``context.importance`` (per-parameter arrays
  keyed by initializer name; see :func:`taylor_importance_from_torch`);
* ``random``: uniform scores from the context seed (a control);
* ``sensitivity``: ``l1`` within a group, and between groups a measured weight per group (the
  output change per channel when its lowest-l1 quarter is masked, :mod:`.group_sensitivity`),
  applied by ``prune-channels`` after the per-group normalization.

The default is ``l1``, chosen by comparison on trained weights (BENCHMARKS.md, Pruning run 4;
``bench/bench_prune.py --importance``): on the digits CNN, after ``reconstruct`` every criterion
lands within about one point of the others at every setting (ratio 0.3/0.5, target_latency
0.8/0.6; l1 0.972-0.989, the best 0.975-0.994), so the re-fit, not the ranking, recovers the
accuracy; before the re-fit l1, bn-scale and activation rank best. l1 needs neither calibration
data nor gradients. Score BatchNorm-unfolded models (prune before ``O1``): on filters with
BatchNorm folded in, l1 ranks ``W * gamma / sigma`` and kept channels that cost ~2 points more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from onnxforge.errors import CalibrationDataError, PassOptionError
from onnxforge.ir.graph import const_value
from onnxforge.passes.prune.dependency import Dependency

NORM_ROLES = ("out_weight", "dw_weight", "in_weight", "bn_scale")
"""Coupled tensors whose slice norms make up the ``l1`` / ``l2`` group importance."""

CRITERIA = ("l1", "l2", "bn-scale", "activation", "entropy", "reconstruction", "taylor", "random", "sensitivity")


def _slice_reduce(arr: np.ndarray, axis: int, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    moved = np.moveaxis(np.asarray(arr, dtype=np.float64), axis, 0).reshape(arr.shape[axis], -1)
    return fn(moved)


def _accumulate(scores: dict[int, float], roots: np.ndarray, elems: np.ndarray, values: np.ndarray) -> None:
    mean = float(np.mean(values)) if values.size else 0.0
    norm = values / mean if mean > 0 else np.zeros_like(values)
    for r, s in zip(roots[elems].tolist(), norm.tolist()):
        scores[r] = scores.get(r, 0.0) + s


def _norm_scores(dep: Dependency, roots: np.ndarray, roles: Iterable[str], kind: str) -> dict[int, float]:
    roles = set(roles)
    fn = (lambda m: np.abs(m).sum(1)) if kind == "l1" else (lambda m: np.sqrt((m * m).sum(1)))
    scores: dict[int, float] = {}
    for cut in dep.cuts:
        if cut.kind != "param" or cut.role not in roles:
            continue
        arr = const_value(cut.value)
        if arr is None:
            continue
        _accumulate(scores, roots, cut.elems, _slice_reduce(arr, cut.axis, fn))
    return scores


class _ChannelStats:
    """Per-position mean |x| and a value sample (for histograms) along one axis."""

    def __init__(self, axis: int, keep: int = 2048):
        self.axis, self.keep = axis, keep
        self.total: np.ndarray | None = None
        self.total_sq: np.ndarray | None = None
        self.count = 0
        self.samples: list[np.ndarray] = []

    def update(self, name: str, array: np.ndarray) -> None:
        moved = np.moveaxis(np.asarray(array, dtype=np.float64), self.axis, 0)
        moved = moved.reshape(moved.shape[0], -1)
        s = np.abs(moved).sum(1)
        sq = (moved * moved).sum(1)
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += moved.shape[1]
        if sum(x.shape[1] for x in self.samples) < self.keep:
            self.samples.append(moved[:, : self.keep])

    def mean_abs(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def mean_sq(self) -> np.ndarray:
        return self.total_sq / max(self.count, 1)

    def entropy(self, bins: int = 32) -> np.ndarray:
        data = np.concatenate(self.samples, axis=1)
        out = np.zeros(data.shape[0])
        for i, row in enumerate(data):
            lo, hi = float(row.min()), float(row.max())
            if hi <= lo:
                continue
            hist, _ = np.histogram(row, bins=bins, range=(lo, hi))
            p = hist[hist > 0] / hist.sum()
            out[i] = float(-(p * np.log2(p)).sum())
        return out


def _data_scores(dep: Dependency, roots: np.ndarray, context: Any, kind: str) -> dict[int, float]:
    data = getattr(context, "calibration_data", None)
    if data is None:
        raise CalibrationDataError(
            f"prune-channels(criterion={kind}) needs calibration data: give the pipeline calibration data "
            "(--calibration-data) or use criterion=l1"
        )
    from onnxforge.runtime.activations import collect_stats

    # The tensors through which a pruned channel enters a weighted layer: what the next layer sees.
    targets: dict[str, Any] = {}
    for cut in dep.cuts:
        if cut.kind == "param" and cut.role == "in_weight":
            v = cut.node.inputs[0]
            layout = dep.layouts.get(v)
            if v is not None and v.name and layout is not None and not v.is_graph_input():
                targets[v.name] = layout
    if not targets:
        return {}
    max_samples = (getattr(context, "options", None) or {}).get("num_samples", 64)
    reducers = {name: _ChannelStats(layout.axis) for name, layout in targets.items()}
    collect_stats(dep.model, data, list(targets), _Dispatch.factory(reducers), max_samples=max_samples)
    scores: dict[int, float] = {}
    if kind == "reconstruction":
        # One score tensor per consumer: its input channels' energy times its weight columns' norm.
        for cut in dep.cuts:
            if cut.kind != "param" or cut.role != "in_weight":
                continue
            red = reducers.get(cut.node.inputs[0].name) if cut.node.inputs[0] is not None else None
            w = const_value(cut.value)
            if red is None or red.total is None or w is None:
                continue
            energy = red.mean_sq()
            col = _slice_reduce(w, cut.axis, lambda m: (m * m).sum(1))
            if len(energy) == len(col) == len(cut.elems):
                _accumulate(scores, roots, cut.elems, energy * col)
        return scores
    for name, red in reducers.items():
        if red.total is None:
            continue
        vals = red.mean_abs() if kind == "activation" else red.entropy()
        layout = targets[name]
        if len(vals) != len(layout.elems):
            continue
        _accumulate(scores, roots, layout.elems, vals)
    return scores


class _Dispatch:
    """A reducer forwarding ``update(name, array)`` to the reducer of that name."""

    def __init__(self, reducers: dict[str, _ChannelStats]):
        self.reducers = reducers

    def update(self, name: str, array: np.ndarray) -> None:
        self.reducers[name].update(name, array)

    @classmethod
    def factory(cls, reducers: dict[str, _ChannelStats]) -> Callable[[], _Dispatch]:
        shared = cls(reducers)
        return lambda: shared


def _taylor_scores(dep: Dependency, roots: np.ndarray, context: Any) -> dict[int, float]:
    importance = getattr(context, "importance", None)
    if not importance:
        raise PassOptionError(
            "prune-channels(criterion=taylor) needs per-parameter importances in the pass context "
            "(PassContext.importance, keyed by initializer name); compute them with "
            "onnxforge.passes.prune.importance.taylor_importance_from_torch"
        )
    scores: dict[int, float] = {}
    for cut in dep.cuts:
        if cut.kind != "param" or cut.value is None or cut.value.name not in importance:
            continue
        arr = np.abs(np.asarray(importance[cut.value.name], dtype=np.float64))
        if arr.ndim <= cut.axis or arr.shape[cut.axis] != len(cut.elems):
            continue
        _accumulate(scores, roots, cut.elems, _slice_reduce(arr, cut.axis, lambda m: m.sum(1)))
    return scores


def class_scores(dep: Dependency, criterion: str, context: Any, seed: int = 0) -> tuple[dict[int, float], list[str]]:
    """Score of every class root under ``criterion``; notes on fallbacks."""
    if criterion not in CRITERIA:
        raise PassOptionError(f"prune-channels: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    roots = dep.roots()
    notes: list[str] = []
    l1 = _norm_scores(dep, roots, NORM_ROLES, "l1")
    if criterion in ("l1", "sensitivity"):  # sensitivity: l1 within a group, measured weights between groups
        return l1, notes
    if criterion == "l2":
        return _norm_scores(dep, roots, NORM_ROLES, "l2"), notes
    if criterion == "random":
        rng = np.random.default_rng(seed)
        all_roots = sorted(set(roots.tolist()))
        return dict(zip(all_roots, rng.random(len(all_roots)).tolist())), notes
    if criterion == "bn-scale":
        primary = _norm_scores(dep, roots, ("bn_scale",), "l1")
    elif criterion in ("activation", "entropy", "reconstruction"):
        primary = _data_scores(dep, roots, context, criterion)
    else:
        primary = _taylor_scores(dep, roots, context)
    # Groups the criterion does not reach keep their l1 order.
    merged: dict[int, float] = {}
    fallback = 0
    for g in dep.groups():
        have = [r for r in g.all_classes.tolist() if r in primary]
        use = primary if len(have) == len(g.all_classes) else l1
        fallback += use is l1 and len(g.classes) > 0
        for r in g.all_classes.tolist():
            merged[r] = use.get(r, 0.0)
    if fallback:
        notes.append(f"criterion {criterion} does not reach {fallback} group(s); they were ranked by l1")
    return merged, notes


def taylor_importance_from_torch(
    module: Any, loss_fn: Callable[[Any, Any], Any], data: Iterable[Any], *, name_map: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """First-order Taylor importances ``|w * dL/dw|`` of every parameter of a torch module.

    ``data`` yields ``(inputs, targets)`` (``inputs`` a tensor or a tuple of tensors); the loss
    ``loss_fn(module(*inputs), targets)`` is back-propagated for each batch and ``|w * grad|`` is
    accumulated (summed over batches). The result is keyed by the ``state_dict`` names
    (``layer1.0.conv1.weight``), which is what ``torch.onnx.export`` names the initializers of
    parameters (both exporters, when BatchNorm is not folded into Conv); ``name_map`` renames keys
    for exports that differ. Give the result as ``PassContext(importance=...)`` and run
    ``prune-channels(criterion=taylor)``. Tensors not found in the ONNX model are ignored by the pass.

    The model is put in eval mode (BatchNorm statistics stay fixed) and its gradients are cleared.
    """
    import torch

    module.eval()
    params = dict(module.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for inputs, targets in data:
        inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        module.zero_grad(set_to_none=True)
        loss = loss_fn(module(*inputs), targets)
        loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is not None:
                    total[name] += (p * p.grad).abs()
    module.zero_grad(set_to_none=True)
    name_map = name_map or {}
    return {name_map.get(k, k): v.detach().cpu().numpy() for k, v in total.items()}
