"""Latency-aware channel allocation for ``prune-channels(target_latency=...)`` (NetAdapt / HALP style).

FLOPs are a poor proxy for what a cut buys on onnxruntime's CPU kernels: a Conv whose channel count
is not a multiple of the NCHWc block (16 floats with AVX-512, 8 with AVX2) drops out of the blocked
kernels and gets ``ReorderInput``/``ReorderOutput`` around it, so a 30 % cut to odd widths can be
*slower* than the unpruned model (the demo's digits CNN: 16/32/64 channels -> 12/23/45 ran 1.56x
slower; the same cut to multiples of 16 runs faster). So the cut is allocated on measured latency:

* **Candidate widths** of a group (kept classes) are multiples of the preferred block of the
  detected ISA (:func:`preferred_block`; halved while a group has no candidate, down to 1), within
  ``max_layer_ratio`` of the group and never removing a blocked class.
* **Measurement**, in the real input shapes (the first calibration feed, ``latency_batch`` rows)
  with ``ORT_ENABLE_ALL`` on the target's provider, each variant interleaved with the unpruned one
  (:func:`timed`: medians of each run's thread CPU time on the CPU provider with one thread, robust
  on a shared, loaded machine). :func:`measure_model` times the whole model with only one group
  shrunk to each width: ``r_g(w) = t(w) / t(full)``. :func:`measure_layers` (large models) times
  only the group's *region* -- the nodes its channels flow through (:func:`region`), cut out as a
  model of its own with the shapes of :func:`static_types` -- and scales by the whole model:
  ``r_g(w) = 1 + (t_region(w) - t_region(full)) / t_model``. The per-group costs are assumed
  additive: ``T(w) / T = 1 + sum_g (r_g(w_g) - 1)`` (orientation: predicted 0.58 / 0.78 / 0.67,
  measured 0.67 / 0.77 / 0.71).
* **Monotone widths**: a width measured slower than (or as slow as) any wider width of its group is
  dropped (:func:`monotone`), so the pass never emits a width that a wider one beats.
* **Allocation** (:func:`allocate`): greedily, from full widths, take the step (one group to a
  narrower candidate width) with the largest measured latency saved per unit of importance lost,
  ``(r_g(w) - r_g(w')) / sum_{removed classes} s_c / mean_g(s)``, until the predicted latency
  ratio is at most ``target_latency`` (and the FLOPs at most ``target_flops`` when given); the
  classes removed are the lowest-scoring ones of each group.

The table can be written to / read from JSON (``latency_table=path``): the build is then
reproducible, and tests use a hand-made table. Measuring costs ``sum_g (1 + #widths_g)`` sessions.
Not modelled: several threads (the table is single-threaded CPU time) and cross-group effects
(a layout reorder that only disappears when two neighbouring groups both reach block widths).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.errors import PassOptionError
from onnxforge.passes.prune.dependency import Group

TABLE_VERSION = 1


def preferred_block(flags: Sequence[str] | None = None) -> int:
    """Channel block onnxruntime's NCHWc Conv kernels use on this CPU (MLAS): 16 with AVX-512,
    8 with AVX2, else 4 (other ISAs: a conservative width the measurement then checks). The CPU's
    features come from :func:`onnxforge.runtime.cpu.detect_isa` (``flags`` fakes them)."""
    from onnxforge.runtime.cpu import detect_isa

    isa = detect_isa(flags, arch="x86_64") if flags is not None else detect_isa()
    if isa.avx512:
        return 16
    if isa.avx2:
        return 8
    return 4


def candidate_widths(n: int, min_keep: int, block: int, max_candidates: int = 6) -> list[int]:
    """Widths (kept classes) below ``n`` a group may be cut to: multiples of ``block`` in
    ``[min_keep, n)``, the widest ``max_candidates`` of them; the block is halved while none fits."""
    min_keep = max(1, min_keep)
    step = max(1, block)
    while True:
        widths = [w for w in range(step, n, step) if w >= min_keep]
        if widths or step == 1:
            break
        step //= 2
    return sorted(widths, reverse=True)[:max_candidates]


def monotone(ratios: Mapping[int, float], full_width: int, full_ratio: float = 1.0) -> dict[int, float]:
    """Widths whose measured ratio is below that of every wider width (the full one included)."""
    kept: dict[int, float] = {}
    best = full_ratio
    for w in sorted(ratios, reverse=True):
        if w >= full_width:
            continue
        r = float(ratios[w])
        if r < best:
            kept[w] = r
            best = r
    return kept


@dataclasses.dataclass
class LatencyTable:
    """Measured latency ratios ``t(width) / t(full)`` per group (keyed by :func:`group_key`)."""

    groups: dict[str, dict[int, float]]
    block: int = 0
    base_ms: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": TABLE_VERSION, "block": self.block, "base_ms": self.base_ms, "info": self.info,
            "groups": {k: {str(w): r for w, r in sorted(v.items(), reverse=True)} for k, v in self.groups.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyTable:
        if data.get("version") != TABLE_VERSION:
            raise PassOptionError(f"latency table version {data.get('version')!r} is not {TABLE_VERSION}; re-measure it")
        groups = {k: {int(w): float(r) for w, r in v.items()} for k, v in data["groups"].items()}
        return cls(groups, int(data.get("block", 0)), float(data.get("base_ms", 0.0)), dict(data.get("info", {})))

    def save(self, path: str | os.PathLike) -> None:
        from onnxforge.atomic import atomic_write_bytes

        # Atomic: parallel tune workers may share one table file.
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1, sort_keys=True).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        try:
            return cls.from_json(json.loads(pathlib.Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PassOptionError(f"prune-channels: cannot read latency table {str(path)!r}: {e}") from e


PER_ROUND = 3


def _cpu_name() -> str:
    from onnxforge.runtime.cpu import detect_isa

    isa = detect_isa()
    return f"{isa.model_name or platform.machine()} ({isa.path})"


def _clock(providers: Sequence[str], threads: int | None) -> str:
    return "thread CPU time, median" if tuple(providers) == ("cpu",) and threads == 1 else "wall, minimum"


def timed(variants: Mapping[str, Any], feeds: Mapping[str, np.ndarray] | None, *, rounds: int,
          providers: Sequence[str] = ("cpu",), threads: int | None = 1) -> dict[str, float]:
    """A latency (ms) per variant, all timed interleaved in one process.

    On the CPU provider with one intra-op thread onnxruntime runs the graph on the calling thread,
    so the *thread CPU time* of ``run`` is the kernels' time and nothing else: on a shared machine
    whose load average is several times its core count, wall time is mostly waiting for a core (a
    model's median wall time was 9x its thread time on a 2-core box at load 16; the thread times of
    30 runs spread 3.7-4.6 ms). Medians of thread time are returned then. Otherwise (other
    providers, several threads) the minima of interleaved wall-clock runs
    (:func:`~onnxforge.runtime.bench.bench_interleaved`): the least disturbed run.
    """
    import warnings

    if tuple(providers) != ("cpu",) or threads != 1:
        from onnxforge.runtime.bench import bench_interleaved

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bench_interleaved(dict(variants), None if feeds is None else dict(feeds), rounds=rounds,
                                    per_round=PER_ROUND, warmup=3, providers=providers, threads=threads,
                                    optimize="all")
        return {k: r.min_ms for k, r in res.items()}
    from onnxforge.runtime.bench import thread_time_interleaved

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = thread_time_interleaved(variants, feeds, rounds=rounds, per_round=PER_ROUND)
    return {k: float(np.median(v)) for k, v in times.items()}


def group_key(g: Group) -> str:
    """A group's name in a latency table: its layers' node names."""
    return g.name


def measure_model(
    model: ir.Model,
    widths: Mapping[int, list[int]],
    shrink_copy: Callable[[int, int], ir.Model],
    groups: Sequence[Group],
    feeds: Mapping[str, np.ndarray],
    *,
    rounds: int = 10,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = 1,
    block: int = 0,
) -> LatencyTable:
    """Time the model with one group at a time shrunk to each candidate width, interleaved with the
    unpruned model; ``shrink_copy(group_index, width)`` returns such a model (a copy)."""
    from onnxforge.ir.io import model_to_bytes

    base = model_to_bytes(model)
    table: dict[str, dict[int, float]] = {}
    base_ms = []
    for g in groups:
        ws = widths.get(g.index) or []
        if not ws:
            continue
        variants: dict[str, Any] = {"full": base}
        for w in ws:
            variants[str(w)] = model_to_bytes(shrink_copy(g.index, w))
        res = timed(variants, feeds, rounds=rounds, providers=providers, threads=threads)
        full = res["full"]
        base_ms.append(full)
        table[group_key(g)] = {w: res[str(w)] / full for w in ws}
    info = {"rounds": rounds, "threads": threads, "providers": list(providers),
            "shapes": {k: list(np.shape(v)) for k, v in feeds.items()}, "cpu": _cpu_name()}
    info.update(scope="model", clock=_clock(providers, threads))
    return LatencyTable(table, block, float(np.median(base_ms)) if base_ms else 0.0, info)


# --------------------------------------------------------------------------- layer scope


def static_types(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``name -> (elem_type, static shape)`` of every value, by ONNX shape inference with the
    graph inputs fixed to the shapes of ``feeds`` (the user's dims)."""
    import onnx

    proto = ir.serde.serialize_model(model)
    for inp in proto.graph.input:
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in np.shape(feeds[inp.name]):
                dims.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # a best effort: values without a static shape are simply not measurable
        inferred = proto
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = vi.type.tensor_type
        if t.elem_type and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = (t.elem_type, tuple(int(d.dim_value) for d in t.shape.dim))
    return out


def region(dep: Any, g: Group) -> list[ir.Node]:
    """The nodes a group's channels flow through: producers and readers of every value whose
    channel axis carries the group's classes, in graph order."""
    roots = dep.roots()
    classes = set(g.all_classes.tolist())
    nodes: dict[int, ir.Node] = {}
    for v, lay in dep.layouts.items():
        if not classes.intersection(roots[np.unique(lay.elems)].tolist()):
            continue
        if v.producer() is not None:
            nodes[id(v.producer())] = v.producer()
        for user in v.consumers():
            nodes[id(user)] = user
    for s in g.spaces:
        if s.node is not None:
            nodes[id(s.node)] = s.node
    order = {id(n): i for i, n in enumerate(dep.model.graph)}
    return sorted(nodes.values(), key=lambda n: order.get(id(n), 1 << 30))


def region_model(model: ir.Model, nodes: Sequence[ir.Node], types: Mapping[str, tuple[int, tuple[int, ...]]]):
    """A standalone ``ModelProto`` of ``nodes``: outside values become inputs (static shapes from
    ``types``), constants become initializers, values read outside (or by nobody) are outputs.
    None when a boundary value has no static float type."""
    import onnx

    from onnxforge.ir.graph import const_tensor
    from onnxforge.runtime._model import tensor_proto_inline

    inside = {id(n) for n in nodes}
    produced = {o.name for n in nodes for o in n.outputs if o.name}
    inputs, inits, outputs, seen = [], [], [], set()
    for n in nodes:
        if n.domain not in ("", "ai.onnx") or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in n.attributes.values()):
            return None
        for v in n.inputs:
            if v is None or not v.name or v.name in produced or v.name in seen:
                continue
            seen.add(v.name)
            tensor = const_tensor(v)
            if tensor is not None:
                t = tensor_proto_inline(tensor)  # the region runs from bytes: no external references
                t.name = v.name
                inits.append(t)
                continue
            typ = types.get(v.name)
            if typ is None or typ[0] not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                return None  # e.g. a shape computed outside: random data would not do
            inputs.append(onnx.helper.make_tensor_value_info(v.name, typ[0], typ[1]))
        for o in n.outputs:
            if not o.name:
                continue
            if o.is_graph_output() or not o.consumers() or any(id(u) not in inside for u in o.consumers()):
                typ = types.get(o.name)
                if typ is None:
                    return None
                outputs.append(onnx.helper.make_tensor_value_info(o.name, typ[0], None))
    if not inputs or not outputs:
        return None
    graph = onnx.helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "latency_region",
                                   inputs, outputs, inits)
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
        ir_version=model.ir_version)


def measure_layers(
    model: ir.Model,
    dep: Any,
    widths: Mapping[int, list[int]],
    groups: Sequence[Group],
    feeds: Mapping[str, np.ndarray],
    *,
    analyze: Callable[[ir.Model], Any],
    shrink_apply: Callable[[Any, set[int]], Any],
    rounds: int = 10,
    providers: Sequence[str] = ("cpu",),
    threads: int | None = 1,
    block: int = 0,
    notes: list[str] | None = None,
) -> LatencyTable:
    """Time each group's region (:func:`region`, in the real shapes) at each width against itself
    unpruned, interleaved; ``r_g(w) = 1 + (t_region(w) - t_region(full)) / t_model``."""
    from onnxforge.ir.io import model_to_bytes

    notes = notes if notes is not None else []
    whole = timed({"model": model_to_bytes(model)}, feeds, rounds=max(3, rounds // 2), providers=providers,
                  threads=threads)["model"]
    types = static_types(model, feeds)
    table: dict[str, dict[int, float]] = {}
    unmeasured = []
    for g in groups:
        ws = widths.get(g.index) or []
        if not ws:
            continue
        proto = region_model(model, region(dep, g), types)
        anchor = next((s.node.name for s in g.spaces if s.node is not None and not s.filler), None)
        if proto is None or anchor is None:
            unmeasured.append(group_key(g))
            continue

        def shrunk(width: int):
            mini = ir.serde.deserialize_model(proto)
            dep_m = analyze(mini)
            g_m = next((h for h in dep_m.groups() if any(
                s.node is not None and s.node.name == anchor and not s.filler for s in h.spaces)), None)
            if g_m is None or len(g_m.all_classes) != len(g.all_classes) or len(g_m.classes) < len(g.all_classes) - width:
                return None
            if width < len(g.all_classes):
                shrink_apply(dep_m, set(g_m.classes.tolist()[: len(g.all_classes) - width]))
            return model_to_bytes(mini)

        variants = {"full": shrunk(len(g.all_classes))}
        variants.update({str(w): shrunk(w) for w in ws})
        if any(v is None for v in variants.values()):
            unmeasured.append(group_key(g))
            continue
        try:
            res = timed(variants, None, rounds=rounds, providers=providers, threads=threads)
        except Exception as e:  # noqa: BLE001 - a region onnxruntime refuses is reported, not fatal
            unmeasured.append(f"{group_key(g)} ({type(e).__name__})")
            continue
        table[group_key(g)] = {w: 1.0 + (res[str(w)] - res["full"]) / whole for w in ws}
    if unmeasured:
        notes.append(f"latency of {len(unmeasured)} group(s) not measured in layer scope (their region "
                     f"has a non-float or non-static boundary); they stay at full width: {unmeasured[:5]}")
    info = {"rounds": rounds, "threads": threads, "providers": list(providers), "scope": "layer",
            "clock": _clock(providers, threads),
            "shapes": {k: list(np.shape(v)) for k, v in feeds.items()},
            "cpu": _cpu_name()}
    return LatencyTable(table, block, whole, info)


@dataclasses.dataclass
class Allocation:
    widths: dict[int, int]  # group index -> kept classes
    removed: dict[int, list[int]]  # group index -> class roots removed (lowest scores first)
    predicted: float  # predicted latency ratio
    reached: bool
    steps: list[dict[str, Any]]


def allocate(
    groups: Sequence[Group],
    scores: Mapping[int, float],
    table: LatencyTable,
    target_latency: float,
    caps: Mapping[int, int],
    *,
    flops_ok: Callable[[dict[int, list[int]]], bool] | None = None,
    group_weight: Mapping[int, float] | None = None,
) -> Allocation:
    """Greedy allocation: largest measured latency saved per unit of importance lost first.

    ``caps[g]``: most classes group ``g`` may lose. ``flops_ok(removed)`` (optional) must also hold
    at the end (a FLOPs target). Groups without a row in ``table`` are left at full width.
    ``group_weight[g]`` (optional) scales the group-normalized scores of group ``g`` (a measured
    loss per channel, :mod:`.group_sensitivity`); without it every group weighs 1 per channel.
    """
    state: dict[int, int] = {}
    order: dict[int, list[int]] = {}
    norm: dict[int, dict[int, float]] = {}
    options: dict[int, dict[int, float]] = {}
    for g in groups:
        row = table.groups.get(group_key(g))
        if not row or len(g.classes) == 0:
            continue
        n = len(g.all_classes)
        vals = [scores.get(r, 0.0) for r in g.all_classes.tolist()]
        mean = float(np.mean(vals)) if vals else 0.0
        weight = 1.0 if group_weight is None else float(group_weight.get(g.index, 1.0))
        norm[g.index] = {r: (weight * scores.get(r, 0.0) / mean if mean > 0 else 0.0) for r in g.classes.tolist()}
        order[g.index] = sorted(g.classes.tolist(), key=lambda r: (scores.get(r, 0.0), r))
        lowest = n - caps.get(g.index, 0)
        options[g.index] = {w: r for w, r in monotone(row, n).items() if w >= lowest}
        state[g.index] = n
    full = {g.index: len(g.all_classes) for g in groups}
    ratio_now = {gi: 1.0 for gi in state}
    predicted = 1.0
    steps: list[dict[str, Any]] = []

    def removed_now() -> dict[int, list[int]]:
        return {gi: order[gi][: full[gi] - w] for gi, w in state.items() if w < full[gi]}

    def done() -> bool:
        return predicted <= target_latency + 1e-12 and (flops_ok is None or flops_ok(removed_now()))

    while not done():
        best = None
        for gi, w_now in state.items():
            lost_before = full[gi] - w_now
            for w, r in options[gi].items():
                if w >= w_now:
                    continue
                gain = ratio_now[gi] - r
                if gain <= 0:
                    continue
                lost = sum(norm[gi][c] for c in order[gi][lost_before: full[gi] - w])
                value = gain / (lost + 1e-9)
                if best is None or value > best[0]:
                    best = (value, gi, w, r, gain, lost)
        if best is None:
            break
        _, gi, w, r, gain, lost = best
        state[gi], ratio_now[gi] = w, r
        predicted -= gain
        steps.append({"group": gi, "width": w, "latency_saved": gain, "importance_lost": lost,
                      "predicted": predicted})
    return Allocation(dict(state), removed_now(), predicted, done(), steps)

