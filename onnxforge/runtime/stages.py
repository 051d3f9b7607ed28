"""Pipeline stages (model parallelism): cut a model into N consecutive sub-models, run them as a pipeline.

**Cut.** Nodes are taken in the graph's (topological) order; a cut after position ``p`` is crossed by the
*frontier* ``F(p)``: the non-constant tensors produced at or before ``p`` (graph inputs included) that a
node after ``p`` reads. Graph outputs leave at the stage that produces them and do not count.
``Constant`` nodes are not positions: each stage that reads one gets its own copy. Candidate cuts are
the positions with the narrowest frontier that still gives ``N`` stages (single-tensor frontiers when
there are enough of them: one tensor to ship between processes). Among them, a dynamic program picks
the ``N - 1`` cuts that minimise the most expensive stage (the pipeline's bottleneck), where a stage's
cost is the sum of its nodes' measured times (onnxruntime's profiler, optimizations off so that node
names match; uniform costs if profiling is not possible).

**Run.** One process per stage (``spawn``), each with its own onnxruntime session, linked by queues:
the driver puts batch ``i`` into stage 0 while stage 1 works on batch ``i - 1``. A message is the dict
of tensors still needed downstream (the next stages' inputs and the graph outputs produced so far);
the last stage hands it to the driver, which joins the outputs in input order. The arithmetic of each
node is unchanged, so with ``optimize="disable"`` the outputs equal the whole model's exactly; with
onnxruntime's optimizations on, fusions cannot cross a cut, which may change the last bits.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_module
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.errors import OnnxforgeError, UnsupportedModelError

__all__ = ["PipelineResult", "Stage", "StagePlan", "load_manifest", "measure_costs", "plan_stages", "run_pipeline",
           "write_stages"]

MANIFEST = "manifest.json"
_READY_TIMEOUT_S = 600.0


@dataclass
class Stage:
    index: int
    nodes: int
    inputs: list[str]
    outputs: list[str]
    cost_us: float
    file: str = ""


@dataclass
class StagePlan:
    stages: list[Stage]
    models: list[onnx.ModelProto] = field(repr=False)
    inputs: list[str]
    outputs: list[str]
    costs: str  # "profile" or "uniform"
    frontier_widths: list[int]

    def manifest(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs, "costs": self.costs,
                "frontier_widths": self.frontier_widths, "stages": [asdict(s) for s in self.stages]}


# --------------------------------------------------------------------------- planning


def _node_costs(proto: onnx.ModelProto, costs: Mapping[str, float] | None) -> tuple[list[float], str]:
    nodes = list(proto.graph.node)
    if costs is None:
        return [1.0] * len(nodes), "uniform"
    return [float(costs.get(n.name, 0.0)) for n in nodes], "profile"


def measure_costs(model_bytes: bytes, runs: int = 10, batch_size: int | None = None) -> dict[str, float]:
    """``{node name: mean µs per run}`` from onnxruntime's profiler (optimizations off, 1 thread)."""
    from onnxforge.runtime.profile import profile

    result = profile(model_bytes, None, optimize="disable", runs=runs, warmup=2, top=1_000_000, threads=1,
                     batch_size=batch_size)
    return {n.name: n.total_ms * 1000.0 / max(1, result.runs) for n in result.nodes}


def _frontiers(proto: onnx.ModelProto, positions: list[int]) -> list[set[str]]:
    """Frontier after each position in ``positions`` (indices into graph.node)."""
    g = proto.graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    last_use: dict[str, int] = {}
    produced_at: dict[str, int] = {i.name: -1 for i in g.input if i.name not in consts}
    for idx, node in enumerate(g.node):
        if node.op_type == "Constant":
            continue
        for name in _reads(node):
            if name and name not in consts:
                last_use[name] = max(last_use.get(name, -1), idx)
        for name in node.output:
            if name:
                produced_at[name] = idx
    return [{v for v, at in produced_at.items() if at <= p < last_use.get(v, -2)} for p in positions]


def _reads(node: onnx.NodeProto) -> list[str]:
    """Inputs of ``node`` and the outer-scope names its subgraphs read."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {i.name for i in sub.input} | {i.name for i in sub.initializer} | {o for n in sub.node for o in n.output}
            names += [i for n in sub.node for i in _reads(n) if i not in inner]
    return names


def plan_stages(model: Any, n_stages: int, *, costs: Mapping[str, float] | None = None, max_width: int = 4,
                slack: float = 0.1) -> StagePlan:
    """Cut ``model`` (path, bytes, ModelProto or onnx_ir.Model) into ``n_stages`` (see the module doc).

    ``costs``: ``{node name: time}``; None gives uniform costs (use :func:`measure_costs` for measured ones).
    Frontiers up to ``max_width`` tensors are considered (wider ones only if nothing narrower gives
    ``n_stages``); the narrowest width whose bottleneck is within ``slack`` of the best is chosen.
    """
    proto = _as_proto(model)
    if n_stages < 1:
        raise OnnxforgeError(f"--stages must be >= 1, got {n_stages}")
    g = proto.graph
    node_costs, source = _node_costs(proto, costs)
    positions = [i for i, n in enumerate(g.node) if n.op_type != "Constant"]
    if len(positions) < n_stages:
        raise UnsupportedModelError(f"the model has {len(positions)} nodes: it cannot be cut into {n_stages} stages")
    cuttable = positions[:-1]
    fronts = _frontiers(proto, cuttable)
    widths = [len(f) for f in fronts]
    cuts: list[int] = []
    if n_stages > 1:
        # narrowest frontier width whose best plan is within `slack` of the best plan at any width
        plans = {}
        for allowed in sorted(set(widths)):
            candidates = [p for p, w in zip(cuttable, widths) if w <= allowed]
            if len(candidates) >= n_stages - 1:
                plans[allowed] = _balanced_cuts(candidates, positions, node_costs, n_stages)
            if allowed >= max_width and plans:
                break
        best = min(b for _, b in plans.values())
        cuts = next(c for w, (c, b) in sorted(plans.items()) if b <= best * (1.0 + slack))
    bounds = [-1] + cuts + [len(g.node) - 1]
    width_of = dict(zip(cuttable, widths))
    models, stages = [], []
    graph_outputs = [o.name for o in g.output]
    pieces = [[n for n in g.node[bounds[k] + 1 : bounds[k + 1] + 1] if n.op_type != "Constant"] for k in range(n_stages)]
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    stage_inputs = []
    for body in pieces:
        produced = {o for n in body for o in n.output}
        ins = []
        for n in body:
            for name in _reads(n):
                if name and name not in produced and name not in consts and name not in ins:
                    ins.append(name)
        stage_inputs.append(ins)
    for k, body in enumerate(pieces):
        later = set().union(*stage_inputs[k + 1 :]) if k + 1 < n_stages else set()
        produced = [o for n in body for o in n.output if o]
        outs = [o for o in produced if o in later or o in graph_outputs]
        outs.sort(key=lambda o: (o not in graph_outputs, graph_outputs.index(o) if o in graph_outputs else 0))
        models.append(_stage_model(proto, body, stage_inputs[k], outs))
        cost = sum(node_costs[i] for i in range(bounds[k] + 1, bounds[k + 1] + 1) if g.node[i].op_type != "Constant")
        stages.append(Stage(k, len(body), stage_inputs[k], outs, cost))
    return StagePlan(stages, models, [i.name for i in g.input if i.name not in {x.name for x in g.initializer}],
                     graph_outputs, source, [width_of[c] for c in cuts])


def _balanced_cuts(candidates: list[int], positions: list[int], node_costs: list[float],
                   n_stages: int) -> tuple[list[int], float]:
    """``n_stages - 1`` cuts from ``candidates`` minimising the largest stage cost (dynamic programming);
    returns the cuts and that largest cost."""
    prefix = np.concatenate([[0.0], np.cumsum(node_costs)])
    end = positions[-1]

    def seg(a: int, b: int) -> float:  # cost of nodes (a, b]
        return float(prefix[b + 1] - prefix[a + 1])

    points = [-1] + candidates  # a stage starts after a point
    m = len(points)
    inf = float("inf")
    # best[j][s]: minimal bottleneck covering nodes up to points[j] with s stages
    best = [[inf] * n_stages for _ in range(m)]
    back = [[-1] * n_stages for _ in range(m)]
    for j in range(1, m):
        best[j][1] = seg(-1, points[j])
    for s in range(2, n_stages):
        for j in range(1, m):
            for i in range(1, j):
                v = max(best[i][s - 1], seg(points[i], points[j]))
                if v < best[j][s]:
                    best[j][s], back[j][s] = v, i
    total = lambda j: max(best[j][n_stages - 1], seg(points[j], end))  # noqa: E731
    j = min(range(1, m), key=total)
    bottleneck = total(j)
    cuts, s = [], n_stages - 1
    while s >= 1 and j > 0:
        cuts.append(points[j])
        j, s = back[j][s], s - 1
    return sorted(cuts), bottleneck


def _value_infos(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shape inference is a convenience here; missing types are reported below
        inferred = proto
    g = inferred.graph
    return {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}


def _stage_model(proto: onnx.ModelProto, body: list[onnx.NodeProto], inputs: list[str], outputs: list[str]):
    g = proto.graph
    infos = _value_infos(proto)
    missing = [n for n in inputs + outputs if n not in infos or not infos[n].type.HasField("tensor_type")]
    if missing:
        raise UnsupportedModelError(f"split: no type known for the tensor(s) {missing} at a stage boundary; "
                                    f"run 'onnxforge optimize MODEL --passes shape-inference' first")
    reads = {name for n in body for name in _reads(n)}
    const_nodes = [n for n in g.node if n.op_type == "Constant" and any(o in reads for o in n.output)]
    inits = [i for i in g.initializer if i.name in reads]
    graph = onnx.helper.make_graph(const_nodes + list(body), f"{g.name or 'graph'}_stage", [infos[n] for n in inputs],
                                   [infos[n] for n in outputs], inits)
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
                                   producer_name="onnxforge.split")
    model.functions.extend(proto.functions)
    return model


def _as_proto(model: Any) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    from onnxforge.ir.io import load, model_to_proto

    return model_to_proto(load(model))


def write_stages(plan: StagePlan, folder: str | os.PathLike) -> Path:
    """Write ``stage{k}.onnx`` and ``manifest.json`` into ``folder``; returns the manifest's path."""
    from onnxforge.atomic import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stage, model in zip(plan.stages, plan.models):
        stage.file = f"stage{stage.index}.onnx"
        atomic_write_bytes(folder / stage.file, model.SerializeToString())
    path = folder / MANIFEST
    atomic_write_bytes(path, json.dumps(plan.manifest(), indent=2).encode())
    return path


def load_manifest(folder: str | os.PathLike) -> tuple[dict[str, Any], list[bytes]]:
    """The manifest and the stage models' bytes written by :func:`write_stages`."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest, [(folder / s["file"]).read_bytes() for s in manifest["stages"]]
    except (OSError, KeyError, ValueError) as exc:
        raise OnnxforgeError(f"{folder}: not a split model folder ({exc})") from None


# --------------------------------------------------------------------------- running


@dataclass
class PipelineResult:
    outputs: dict[str, np.ndarray]
    n_samples: int
    stages: int
    batch_size: int
    threads_per_stage: int
    wall_s: float
    compute_s: float

    @property
    def samples_per_s(self) -> float:
        return self.n_samples / self.compute_s if self.compute_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "stages": self.stages, "batch_size": self.batch_size,
                "threads_per_stage": self.threads_per_stage, "wall_s": self.wall_s, "compute_s": self.compute_s,
                "samples_per_s": self.samples_per_s, "outputs": {k: list(v.shape) for k, v in self.outputs.items()}}


def _stage_worker(k, model_bytes, keep, threads, optimize, inq, outq, ready) -> None:  # pragma: no cover - child
    try:
        from onnxforge.runtime.session import make_session

        info = make_session(model_bytes, ("cpu",), threads=threads, optimize=optimize)
        session = info.session
        in_names = [i.name for i in session.get_inputs()]
        out_names = [o.name for o in session.get_outputs()]
        ready.put((k, "ok", ""))
    except BaseException as exc:
        ready.put((k, "error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        item = inq.get()
        if item is None or item[0] == "error":
            outq.put(item)
            if item is None:
                return
            continue
        _, i, carried = item
        try:
            outs = session.run(out_names, {n: carried[n] for n in in_names})
        except BaseException as exc:
            outq.put(("error", k, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            continue
        carried.update(zip(out_names, outs))
        outq.put(("ok", i, {n: v for n, v in carried.items() if n in keep}))


def _check_alive(procs) -> None:
    dead = [k for k, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)]
    if dead:
        raise OnnxforgeError(f"stage process(es) {dead} died (exit codes {[procs[k].exitcode for k in dead]}); "
                             f"out of memory, or run from a script without an `if __name__ == '__main__':` guard?")


def run_pipeline(models: Sequence[bytes | onnx.ModelProto], data: Any, *, batch_size: int = 1,
                 threads_per_stage: int = 1, optimize: str = "disable", output_names: Sequence[str] | None = None,
                 ) -> PipelineResult:
    """Run the stage models as a pipeline of processes over ``data`` (named arrays, samples first).

    Outputs are joined in input order. ``compute_s`` runs from when every stage has its session until
    the last batch leaves the last stage.
    """
    from onnxforge.runtime.parallel import _join, _load_arrays

    t0 = time.perf_counter()
    blobs = [m if isinstance(m, bytes) else m.SerializeToString() for m in models]
    protos = [onnx.load_from_string(b) for b in blobs]
    arrays = _load_arrays(data)
    n = {a.shape[0] for a in arrays.values()}
    if len(n) != 1:
        raise OnnxforgeError("input data: arrays disagree on the number of samples")
    n_samples = n.pop()
    if output_names is None:  # every stage output that no later stage reads
        output_names = [o.name for k, p in enumerate(protos) for o in p.graph.output
                        if all(o.name not in {i.name for i in q.graph.input} for q in protos[k + 1 :])]
    keeps = []
    for k in range(len(protos)):
        later = {i.name for p in protos[k + 1 :] for i in p.graph.input}
        keeps.append(later | set(output_names))
    ctx = multiprocessing.get_context("spawn")
    queues = [ctx.Queue() for _ in range(len(protos) + 1)]
    ready = ctx.Queue()
    procs = [ctx.Process(target=_stage_worker, args=(k, blobs[k], keeps[k], threads_per_stage, optimize, queues[k],
                                                     queues[k + 1], ready), daemon=True)
             for k in range(len(protos))]
    for p in procs:
        p.start()
    try:
        waiting, deadline = len(procs), time.monotonic() + _READY_TIMEOUT_S
        while waiting:
            try:
                k, status, text = ready.get(timeout=1.0)
            except queue_module.Empty:
                _check_alive(procs)
                if time.monotonic() > deadline:
                    raise OnnxforgeError("stage processes did not start in time") from None
                continue
            if status != "ok":
                raise OnnxforgeError(f"stage {k}: cannot create a session: {text}")
            waiting -= 1
        start = time.perf_counter()
        batches = list(range(0, n_samples, batch_size))
        for i, lo in enumerate(batches):
            queues[0].put(("ok", i, {name: a[lo : lo + batch_size] for name, a in arrays.items()}))
        queues[0].put(None)
        results: dict[int, dict[str, np.ndarray]] = {}
        while True:
            try:
                item = queues[-1].get(timeout=1.0)
            except queue_module.Empty:
                _check_alive(procs)
                continue
            if item is None:
                break
            if item[0] == "error":
                raise OnnxforgeError(f"stage {item[1]} failed: {item[2]}")
            results[item[1]] = item[2]
        compute = time.perf_counter() - start
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    ordered = [results[i] for i in range(len(batches))]
    outputs = {name: _join(name, [r[name] for r in ordered], squeeze=False) for name in output_names}
    return PipelineResult(outputs, n_samples, len(protos), batch_size, threads_per_stage,
                          time.perf_counter() - t0, compute)
