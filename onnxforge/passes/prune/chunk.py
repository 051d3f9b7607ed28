"""TorchScript's ``chunk`` on a channel axis: Slices whose bounds are computed at run time from the
tensor's shape, and the proof that they still cut equal parts after pruning.

Used by :mod:`.dependency`, which ties position ``j`` of every part into one pruning unit when
:func:`find_chunk` proves the chunk; the Shape and Slice nodes are left as they are and recompute
their bounds.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.ir.graph import const_value

if TYPE_CHECKING:  # the channel layout of a value: its axis and rank
    from onnxforge.passes.prune.dependency import Layout


@dataclasses.dataclass
class Chunk:
    """Slices of one tensor on its channel axis whose bounds are computed at run time from its shape.

    ``part_of`` maps ``id(Slice)`` to the part it takes (of ``parts`` equal consecutive parts);
    ``shape_nodes`` are the ids of the ``Shape`` nodes read only by those bounds; ``reason`` says why
    the slices are not a provable chunk (then ``ok`` is False).
    """

    parts: int = 0
    part_of: dict[int, int] = dataclasses.field(default_factory=dict)
    shape_nodes: set[int] = dataclasses.field(default_factory=set)
    slices: list[ir.Node] = dataclasses.field(default_factory=list)
    blocks: np.ndarray | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


CHUNK_MAX_NODES = 64
CHUNK_EXHAUSTIVE = 128  # part sizes checked one by one up to this; a sample of sizes above it


def find_chunk(x: ir.Value, layout: Layout, shape: tuple | None, opset: int) -> Chunk:
    """Recognise ``x.chunk(n, axis)`` exported with run-time bounds and prove it survives pruning.

    TorchScript exports ``torch.chunk`` on a channel axis of size ``C`` as Slices whose bounds are
    computed from ``Shape(x)``: part ``i`` is ``[i*ceil(C/n), min((i+1)*ceil(C/n), C))``. When
    ``C = n*a`` and every part loses the same ``k`` channels, ``C' = n*(a - k)`` and the same
    arithmetic yields part ``i`` = ``[i*(a-k), (i+1)*(a-k))``: the new parts are exactly the kept
    channels of the old ones, and no constant needs rewriting. The proof does not pattern-match the
    arithmetic. The bounds subgraph (every node between ``Shape(x)`` / constants and the Slice bounds,
    read by nothing else) is a pure function of ``x``'s shape; it is evaluated with onnx's reference
    evaluator for every part size ``a' = 1 .. a`` (the sizes pruning can reach; a sample of them
    above ``CHUNK_EXHAUSTIVE``) with the dynamic dims varied, and must give part ``i`` =
    ``[i*a', (i+1)*a')`` each time (steps 1, axes = the channel axis).
    """
    slices = [u for u in x.consumers() if u.op_type == "Slice" and u.inputs and u.inputs[0] is x
              and any(v is not None and const_value(v) is None for v in u.inputs[1:5])
              and _may_slice_axis(u, layout)]
    chunk = Chunk(slices=slices)

    def fail(reason: str) -> Chunk:
        chunk.reason = reason
        return chunk

    if not slices:
        return fail("no Slice with run-time bounds")
    if opset < 10:
        return fail("Slice bounds are attributes before opset 10")
    if shape is None or len(shape) != layout.rank or (
            isinstance(shape[layout.axis], int) and shape[layout.axis] != len(layout.elems)):
        return fail("the chunked tensor has an unknown shape")
    # The bounds subgraph, backwards from the Slice bounds to constants and Shape(x).
    nodes: dict[int, ir.Node] = {}
    leaves: dict[ir.Value, np.ndarray] = {}
    stack = [v for s in slices for v in s.inputs[1:5] if v is not None]
    while stack:
        v = stack.pop()
        producer = v.producer()
        if v in leaves or (producer is not None and id(producer) in nodes):
            continue
        arr = const_value(v)
        if arr is not None:
            leaves[v] = arr
            continue
        if v is x or producer is None:
            return fail("the chunk bounds read the data or a graph input")
        if producer.domain not in ("", "ai.onnx") or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in producer.attributes.values()):
            return fail(f"the chunk bounds are computed by {producer.op_type}")
        nodes[id(producer)] = producer
        if len(nodes) > CHUNK_MAX_NODES:
            return fail("the chunk bounds are computed by a large subgraph")
        if producer.op_type == "Shape":
            if producer.inputs[0] is not x:
                return fail("the chunk bounds read the shape of another tensor")
            chunk.shape_nodes.add(id(producer))
            continue
        stack.extend(i for i in producer.inputs if i is not None)
    slice_ids = {id(s) for s in slices}
    for node in nodes.values():
        for out in node.outputs:
            if out.is_graph_output():
                return fail("a chunk bound is a graph output")
            for user in out.consumers():
                if id(user) in nodes or (id(user) in slice_ids and user.inputs[0] is not out):
                    continue
                return fail(f"a chunk bound is also read by {user.op_type}")
    try:
        evaluate = _bounds_evaluator(x, slices, nodes, leaves, layout.rank, opset)
    except Exception as e:  # noqa: BLE001 -- an unevaluable subgraph is simply not proven
        return fail(f"the chunk bounds cannot be evaluated ({type(e).__name__})")

    size = len(layout.elems)
    dynamic = [i for i, d in enumerate(shape) if i != layout.axis and not isinstance(d, int)]

    def ranges(c: int, fill: int) -> list[tuple[int, int]] | None:
        dims = [c if i == layout.axis else (d if isinstance(d, int) else fill) for i, d in enumerate(shape)]
        out = []
        for starts, ends, axes, steps in evaluate(np.array(dims, dtype=np.int64)):
            axes = np.arange(len(starts)) if axes is None else np.asarray(axes).ravel()
            if len(axes) != 1 or int(axes[0]) % layout.rank != layout.axis:
                return None
            if steps is not None and int(np.asarray(steps).ravel()[0]) != 1:
                return None
            lo, hi = (int(np.asarray(b).ravel()[0]) for b in (starts, ends))
            lo = max(0, lo + c) if lo < 0 else min(lo, c)
            hi = max(0, hi + c) if hi < 0 else min(hi, c)
            out.append((lo, hi))
        return out

    try:
        first = ranges(size, 2)
        if first is None:
            return fail("the run-time Slices do not cut the channel axis with step 1")
        lengths = {hi - lo for lo, hi in first}
        length = lengths.pop() if len(lengths) == 1 else 0
        if length <= 0 or size % length or any(lo % length for lo, _ in first):
            return fail(f"the run-time Slices do not cut {size} channels into equal parts")
        parts, a = size // length, length
        sizes = list(range(1, a + 1))
        if a > CHUNK_EXHAUSTIVE:
            rng = np.random.default_rng(0)
            sizes = sorted({*range(1, 17), *range(a - 16, a + 1), *rng.integers(1, a + 1, 64).tolist()})
        fills = (1, 3, 2, 5) if dynamic else (2,)
        for t, s in enumerate(sizes):
            got = ranges(parts * s, fills[t % len(fills)])
            want = [(lo // a * s, (lo // a + 1) * s) for lo, _ in first]
            if got != want:
                return fail(f"the run-time Slice bounds are not {parts} equal parts when the channels change")
    except Exception as e:  # noqa: BLE001
        return fail(f"the chunk bounds cannot be evaluated ({type(e).__name__})")
    chunk.parts = parts
    chunk.part_of = {id(s): lo // a for s, (lo, _) in zip(slices, first)}
    return chunk


def _may_slice_axis(node: ir.Node, layout: Layout) -> bool:
    """False when the Slice's axes are constant and leave out the channel axis."""
    axes = const_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    return axes is None or layout.axis in [int(a) % layout.rank for a in np.asarray(axes).ravel()]


def _bounds_evaluator(x: ir.Value, slices: list[ir.Node], nodes: dict[int, ir.Node],
                      leaves: dict[ir.Value, np.ndarray], rank: int, opset: int):
    """A function ``shape of x -> [(starts, ends, axes, steps) per Slice]`` running the bounds subgraph
    (``Shape(x)`` replaced by a Slice of the given shape) with onnx's reference evaluator."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    names: dict[ir.Value, str] = {}

    def name(v: ir.Value | None) -> str:
        if v is None:
            return ""
        if v not in names:
            names[v] = f"v{len(names)}"
        return names[v]

    inits = [numpy_helper.from_array(np.asarray(arr), name(v)) for v, arr in leaves.items()]
    protos = []
    graph = x.graph
    order = [n for n in graph if id(n) in nodes] if graph is not None else list(nodes.values())
    for node in order:
        if node.op_type == "Shape":
            start = int(node.attributes["start"].value) if "start" in node.attributes else 0
            end = int(node.attributes["end"].value) if "end" in node.attributes else rank
            lo, hi = f"{name(node.outputs[0])}_start", f"{name(node.outputs[0])}_end"
            inits += [numpy_helper.from_array(np.array([start], np.int64), lo),
                      numpy_helper.from_array(np.array([end], np.int64), hi)]
            protos.append(helper.make_node("Slice", ["__shape", lo, hi], [name(node.outputs[0])]))
            continue
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        del proto.output[:]
        proto.input.extend(name(v) for v in node.inputs)
        proto.output.extend(name(v) for v in node.outputs)
        protos.append(proto)
    wanted = []  # per Slice input 1..4: a graph output name, a constant, or None
    outputs: list[str] = []
    for s in slices:
        row = []
        for i in range(1, 5):
            v = s.inputs[i] if i < len(s.inputs) else None
            if v is None:
                row.append(None)
            elif v in leaves:
                row.append(("const", leaves[v]))
            else:
                if name(v) not in outputs:
                    outputs.append(name(v))
                row.append(("out", name(v)))
        wanted.append(row)
    g = helper.make_graph(protos, "chunk_bounds",
                          [helper.make_tensor_value_info("__shape", onnx.TensorProto.INT64, [rank])],
                          [helper.make_empty_tensor_value_info(o) for o in outputs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    session = ReferenceEvaluator(model)

    def evaluate(shape: np.ndarray) -> list[tuple]:
        values = dict(zip(outputs, session.run(None, {"__shape": shape})))
        return [tuple(None if w is None else (w[1] if w[0] == "const" else values[w[1]]) for w in row)
                for row in wanted]

    return evaluate
