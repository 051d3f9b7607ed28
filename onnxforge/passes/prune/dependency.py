"""Channel dependency analysis on an ONNX graph (``onnx_ir``), for structured pruning.

The question pruning must answer: if output channel ``c`` of this Conv goes, what else has to go
with it so that the graph stays consistent? The answer is found by one forward sweep over the graph.

**Elements and layouts.** Every prunable channel dimension -- the output channels of a
Conv/ConvTranspose/Gemm/MatMul whose weight is a constant -- is a *space* of ``C`` *elements*
(integer ids). A tensor whose some axis carries such channels has a *layout*: ``(axis, elems)``
with ``elems[i]`` the element at position ``i`` of that axis. Layouts flow forward:

* channel-preserving ops (activations, BatchNorm, pooling, Resize, Identity, Dropout, Cast, ...)
  copy the layout; per-channel parameters they read (BN scale/bias/mean/var, a per-channel constant
  of a Mul/Add) are recorded as *cuts* -- (constant, axis, elems) -- to be sliced alike;
* Conv/Gemm/MatMul consumers record a cut on their weight's input-channel axis and start a new space;
* a depthwise Conv (group == C) keeps the layout (its weight and ``group`` are cut);
* a grouped Conv (1 < group < C) keeps ``group``: position ``j`` of every channel block is tied
  (input side and output side separately), so each block loses the same channels (see
  ``_Sweep._grouped_conv``);
* elementwise binary ops (residual ``Add``, squeeze-excitation ``Mul``) *tie* the two layouts
  element-wise: a union-find over elements merges them, so a removed channel is removed on both sides;
* ``Concat`` on the channel axis concatenates layouts (offsets are implicit), ``Split`` slices them
  (its sizes are cut);
* ``torch.chunk(n)`` as TorchScript writes it -- Slices whose bounds are computed at run time from
  ``Shape(x)`` -- is accepted when the bounds provably stay ``n`` equal parts as the channel count
  changes (:func:`.chunk.find_chunk` evaluates the bounds subgraph): position ``j`` of every part is tied, as
  for a grouped Conv, and the Shape/Slice nodes are left to recompute;
* ``Flatten``/``Reshape`` merging ``C x H x W`` into features repeats each element ``H*W`` times
  (channel ``c`` -> features ``[c*HW, (c+1)*HW)``); a ``Reshape`` splitting ``D`` into
  ``(heads, head_dim)`` ties the elements of each head together so a head is removed as a unit.
  Reshapes are aligned from the left (equal prefixes) or, failing that, from the right (static
  suffixes of equal size: the prefixes then hold equally many elements);
* a packed projection ``[.., 3E] -> [.., 3, E]`` whose 3-axis is later selected (Gather / Split: q, k,
  v of ``nn.MultiheadAttention``) ties position ``j`` of the three slices, and the channels stay on
  the ``E`` axis; heads folded into the batch axis (``[L, B, H*d] -> [L, B*H, d]``, and back) give a
  *tiled* layout (``Layout.tiled``) that only Transpose and Reshape accept; the ``B*H`` entry of
  those reshapes becomes ``-1``. A head count read at run time by ``Shape`` is accepted only when
  it lands, through Slice and Concat, at the Reshape position that carries the same heads.

An equivalence class of the union-find is the unit that is pruned (a channel, a residual channel
shared by several layers, an attention head). A *group* is a connected set of spaces; ratios apply
per group. Anything the sweep cannot prove safe blocks the elements involved, with a reason: an
unknown op, a layout reaching a graph output, a reshape whose shape is computed at run time or
cannot be mapped, a weight that is not a constant or is shared, ops that mix channels (LayerNorm
over the channel axis, Softmax over it, reductions over it). Blocked classes are never pruned and
each group fully blocked is reported.

Modules: the data model (elements, layouts, spaces, cuts, groups) is :mod:`.groups`, the
Reshape/Flatten mapping :mod:`.reshape`, channel chunks :mod:`.chunk`; this module is the sweep.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.ir.graph import const_value
from onnxforge.passes.prune.chunk import Chunk, find_chunk
# The data model and the reshape rules live in their own modules; their names are re-exported here.
from onnxforge.passes.prune.groups import Cut, Dependency, Group, Layout, Space, UnionFind  # noqa: F401
from onnxforge.passes.prune.reshape import ReshapeRules, _slice_span, static_value  # noqa: F401

# Ops that map each element to an element at the same position (the layout passes through).
UNARY_PASSTHROUGH = frozenset(
    """Relu LeakyRelu PRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu Erf Softplus Softsign
    Mish ThresholdedRelu Shrink Neg Abs Sqrt Exp Log Reciprocal Floor Ceil Round Sign Sin Cos Identity
    Dropout Cast Clip MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool
    IsNaN IsInf Not BitShift""".split()
)
BINARY_BROADCAST = frozenset("Add Sub Mul Div Pow Max Min Sum Mean PRelu And Or Xor".split())
REDUCE_OPS = frozenset(
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
    "ReduceLogSumExp ReduceSumSquare ArgMax ArgMin".split()
)
SOURCE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# --------------------------------------------------------------------------- shapes


def infer_shapes(model: ir.Model) -> dict[str, tuple | None]:
    """Shapes of every value by name: the IR's, completed by ONNX shape inference (data propagation)."""
    shapes: dict[str, tuple | None] = {}
    try:
        proto = ir.serde.serialize_model(model)
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                shapes[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
                )
    except Exception:  # shape inference is a best effort; the IR's own shapes remain
        pass
    for node in model.graph:
        for v in node.outputs:
            if v.name and v.shape is not None and v.name not in shapes:
                shapes[v.name] = tuple(d if isinstance(d, int) else (str(d) if d.value else None) for d in v.shape)
    for v in list(model.graph.inputs) + list(model.graph.initializers.values()):
        if v.name and v.shape is not None and v.name not in shapes:
            shapes[v.name] = tuple(d if isinstance(d, int) else (str(d) if d.value else None) for d in v.shape)
    return shapes


# --------------------------------------------------------------------------- the sweep


class _Sweep(ReshapeRules):
    def __init__(self, model: ir.Model, protect: set[str]):
        self.model = model
        self.dep = Dependency(model)
        self.dep.shapes = infer_shapes(model)
        self.protect = protect
        # Shape reads of a channel count (Slice of Shape) that are fine only if they end up at the
        # same position of a Reshape target shape; value -> (elems, offset in the slice, Shape node).
        self.shape_reads: dict[ir.Value, tuple[np.ndarray, int, ir.Node]] = {}
        self.validated_reads: set[tuple[int, int]] = set()
        # Channel chunks whose Slice bounds are computed from Shape(x) at run time (see _chunk).
        self.chunks: dict[ir.Value, Chunk] = {}

    # helpers
    def shape(self, v: ir.Value | None) -> tuple | None:
        if v is None or not v.name:
            return None
        return self.dep.shapes.get(v.name)

    def rank(self, v: ir.Value | None) -> int | None:
        s = self.shape(v)
        return None if s is None else len(s)

    def lay(self, v: ir.Value | None) -> Layout | None:
        return None if v is None else self.dep.layouts.get(v)

    def set(self, v: ir.Value, layout: Layout | None) -> None:
        if layout is not None and v is not None:
            self.dep.layouts[v] = layout

    def attr(self, node: ir.Node, name: str, default: Any = None) -> Any:
        a = node.attributes.get(name)
        if a is None or a.is_ref():
            return default
        return a.value

    def protected(self, node: ir.Node) -> bool:
        return bool(node.name and node.name in self.protect) or node.op_type in self.protect

    def const_param(self, node: ir.Node, idx: int) -> np.ndarray | None:
        if idx >= len(node.inputs) or node.inputs[idx] is None:
            return None
        return const_value(node.inputs[idx])

    def param_cut(self, node: ir.Node, idx: int, axis: int, elems: np.ndarray, role: str) -> bool:
        """Record a cut of constant input ``idx`` of ``node``; block when it is shared or not constant."""
        v = node.inputs[idx]
        arr = const_value(v)
        if arr is None:
            self.dep.block(elems, f"{node.op_type} input {idx} is not a constant", node)
            return False
        if len(v.consumers()) > 1 or v.is_graph_output():
            self.dep.block(elems, f"weight {v.name!r} is shared by several nodes", node)
            return False
        if arr.ndim <= axis or arr.shape[axis] != len(elems):
            self.dep.block(elems, f"{node.op_type} input {idx} shape {arr.shape} does not match the channels", node)
            return False
        self.dep.cut("param", node, v, axis, elems, role, idx)
        return True

    def run(self) -> Dependency:
        graph = self.model.graph
        handled: set[int] = set()
        for node in graph:
            handled.add(id(node))
            if node.domain not in ("", "ai.onnx"):
                self._block_inputs(node, f"custom-domain op {node.domain}::{node.op_type}")
                continue
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                self._block_inputs(node, f"{node.op_type} with subgraphs")
                continue
            if node.op_type == "Constant":
                continue
            if node.op_type in SOURCE_OPS:
                getattr(self, f"_{node.op_type.lower()}")(node)
                continue
            if not any(self.lay(v) is not None for v in node.inputs):
                continue
            if node.op_type not in ("Transpose", "Reshape", "Identity") and any(
                    lay is not None and lay.tiled for lay in map(self.lay, node.inputs)):
                self._block_inputs(node, f"attention heads merged with the batch axis reach {node.op_type}")
                continue
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                if node.op_type in UNARY_PASSTHROUGH:
                    handler = self._unary
                elif node.op_type in BINARY_BROADCAST:
                    handler = self._binary
                elif node.op_type in REDUCE_OPS:
                    handler = self._reduce
            if handler is None:
                self._block_inputs(node, f"{node.op_type} is not known to preserve channels")
                continue
            handler(node)
        # Channel counts read by Shape must all have been matched to a Reshape (see _shape_cut).
        for v, (elems, _, shape_node) in self.shape_reads.items():
            if any((id(v), id(u)) not in self.validated_reads for u in v.consumers()) or v.is_graph_output():
                self.dep.block(elems, "the channel count is read by Shape", shape_node)
        # Layouts read by anything outside the sweep (subgraph captures) or by a graph output.
        for v, layout in self.dep.layouts.items():
            if v.is_graph_output():
                self.dep.block(layout.elems, f"reaches graph output {v.name!r}", v.producer())
            for user in v.consumers():
                if id(user) not in handled:
                    self.dep.block(layout.elems, f"read inside a subgraph by {user.op_type}", user)
        return self.dep

    def _block_inputs(self, node: ir.Node, reason: str, only: list[int] | None = None) -> None:
        for i, v in enumerate(node.inputs):
            if only is not None and i not in only:
                continue
            layout = self.lay(v)
            if layout is not None:
                self.dep.block(layout.elems, reason, node)

    # --- sources ----------------------------------------------------------------------------------

    def _new_out(self, node: ir.Node, size: int, axis: int) -> Space:
        out = node.outputs[0]
        rank = self.rank(out) or (axis + 1)
        space = self.dep.new_space(node, out, size)
        self.set(out, Layout(axis, rank, space.elems))
        if self.protected(node):
            self.dep.block(space.elems, f"protected: {node.name or node.op_type}", node)
        return space

    def _conv(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        w = self.const_param(node, 1)
        self._block_inputs(node, "used as a Conv weight or bias", only=[1, 2])
        if w is None:
            if x is not None:
                self.dep.block(x.elems, "Conv weight is not a constant", node)
            return
        group = int(self.attr(node, "group", 1))
        out_c, in_per_group = w.shape[0], w.shape[1]
        if x is not None and x.axis != 1:
            self.dep.block(x.elems, "Conv input channels are not on axis 1", node)
            x = None
        if group == 1:
            if x is not None:
                if self.protected(node):
                    self.dep.block(x.elems, f"protected: {node.name or node.op_type}", node)
                self.param_cut(node, 1, 1, x.elems, "in_weight")
            space = self._new_out(node, out_c, 1)
            self._cut_out(node, space.elems, w_axis=0)
            return
        if in_per_group == 1 and out_c == group:
            # Depthwise: output channel c reads only input channel c -> the layout passes through.
            if x is None or len(x.elems) != out_c:
                return
            if self.protected(node):
                self.dep.block(x.elems, f"protected: {node.name or node.op_type}", node)
            ok = self.param_cut(node, 1, 0, x.elems, "dw_weight")
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                ok = self.param_cut(node, 2, 0, x.elems, "bias") and ok
            self.dep.cut("group", node, None, 0, x.elems)
            self.set(node.outputs[0], Layout(1, x.rank, x.elems))
            return
        self._grouped_conv(node, x, w, group)

    def _grouped_conv(self, node: ir.Node, x: Layout | None, w: np.ndarray, group: int) -> None:
        """A grouped Conv (1 < group, not depthwise): ``group`` stays, the same positions go in every block.

        With ``G = group``, ``Ig = C_in / G`` and ``Og = C_out / G``, output channel ``g*Og + o``
        reads input channels ``[g*Ig, (g+1)*Ig)`` only, through ``W[g*Og + o, j]`` (``j < Ig``).
        A valid pruned Conv keeps ``G`` blocks of equal size, so every block must lose the same
        number of input channels and of output channels. Input and output sides are independent
        (no element of one is coupled to the other); each side ties position ``j`` of every block:

            input  class j = {x[g*Ig + j] : g < G}   -> removing it drops column j of W (every row);
            output class o = {y[g*Og + o] : g < G}   -> removing it drops rows g*Og + o of W and b.

        So ``W'`` = ``W`` with kept rows and kept columns (two plain cuts), ``C_in' = G * Ig'``,
        ``C_out' = G * Og'`` and ``group`` is unchanged (Torch-Pruning chooses the same indices per
        group too). Pruning is exact: the removed output channels are exactly ``y[g*Og + o]``, and the
        kept ones lose exactly the terms ``W[., j] * x[g*Ig + j]`` of the removed input channels.
        """
        out_c, in_per_group = w.shape[0], w.shape[1]
        if out_c % group:
            if x is not None:
                self.dep.block(x.elems, f"grouped Conv (group={group}) with {out_c} output channels", node)
            return
        if x is not None:
            if len(x.elems) != group * in_per_group:
                self.dep.block(x.elems, f"grouped Conv (group={group}) input does not match its weight", node)
            elif in_per_group == 1:
                self.dep.block(x.elems, f"grouped Conv (group={group}) reads one input channel per group", node)
            else:
                if self.protected(node):
                    self.dep.block(x.elems, f"protected: {node.name or node.op_type}", node)
                blocks = x.elems.reshape(group, in_per_group)
                for row in blocks[1:]:
                    self.dep.tie(blocks[0], row)
                self.param_cut(node, 1, 1, blocks[0], "in_weight")
        space = self._new_out(node, out_c, 1)
        blocks = space.elems.reshape(group, out_c // group)
        for row in blocks[1:]:
            self.dep.tie(blocks[0], row)
        self._cut_out(node, space.elems, w_axis=0)

    def _cut_out(self, node: ir.Node, elems: np.ndarray, w_axis: int) -> None:
        self.param_cut(node, 1, w_axis, elems, "out_weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.param_cut(node, 2, 0, elems, "bias")

    def _convtranspose(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        w = self.const_param(node, 1)
        self._block_inputs(node, "used as a ConvTranspose weight or bias", only=[1, 2])
        group = int(self.attr(node, "group", 1))
        if w is None or group != 1:
            if x is not None:
                self.dep.block(x.elems, "ConvTranspose weight not constant or grouped", node)
            return
        if x is not None:
            if x.axis != 1:
                self.dep.block(x.elems, "ConvTranspose input channels are not on axis 1", node)
            else:
                self.param_cut(node, 1, 0, x.elems, "in_weight")
        space = self._new_out(node, w.shape[1], 1)
        self._cut_out(node, space.elems, w_axis=1)

    def _gemm(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        b = self.const_param(node, 1)
        self._block_inputs(node, "used as a Gemm weight or bias", only=[1, 2])
        trans_a, trans_b = int(self.attr(node, "transA", 0)), int(self.attr(node, "transB", 0))
        if b is None or trans_a or b.ndim != 2:
            if x is not None:
                self.dep.block(x.elems, "Gemm weight is not a constant (or transA=1)", node)
            return
        if x is not None:
            if x.axis != 1:
                self.dep.block(x.elems, "Gemm input layout is not on the feature axis", node)
            else:
                if self.protected(node):
                    self.dep.block(x.elems, f"protected: {node.name or node.op_type}", node)
                self.param_cut(node, 1, 1 if trans_b else 0, x.elems, "in_weight")
        n_out = b.shape[0] if trans_b else b.shape[1]
        c = node.inputs[2] if len(node.inputs) > 2 else None
        c_arr = const_value(c) if c is not None else None
        if c is not None and c_arr is None:
            return  # a run-time bias: its channels cannot be sliced
        space = self._new_out(node, n_out, 1)
        self.param_cut(node, 1, 0 if trans_b else 1, space.elems, "out_weight")
        if c_arr is not None and c_arr.ndim >= 1 and c_arr.shape[-1] == n_out and n_out > 1:
            self.param_cut(node, 2, c_arr.ndim - 1, space.elems, "bias")

    def _matmul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = self.lay(a), self.lay(b)
        w = const_value(b)
        if w is not None and w.ndim == 2 and const_value(a) is None:
            if la is not None:
                if la.axis != la.rank - 1:
                    self.dep.block(la.elems, "MatMul input layout is not on the last axis", node)
                else:
                    if self.protected(node):
                        self.dep.block(la.elems, f"protected: {node.name or node.op_type}", node)
                    self.param_cut(node, 1, 0, la.elems, "in_weight")
            rank = self.rank(node.outputs[0]) or (la.rank if la is not None else 2)
            space = self._new_out(node, w.shape[1], rank - 1)
            self.param_cut(node, 1, 1, space.elems, "out_weight")
            return
        # Activation x activation (attention): batch axes tie, K axes tie, M / N pass.
        ra, rb, ro = self.rank(a), self.rank(b), self.rank(node.outputs[0])
        if ra is None or rb is None or ro is None or ra < 2 or rb < 2:
            self._block_inputs(node, "MatMul of tensors of unknown rank")
            return
        out: Layout | None = None
        ok = True
        if la is not None and lb is not None and la.axis == ra - 1 and lb.axis == rb - 2:
            if len(la.elems) == len(lb.elems):
                self.dep.tie(la.elems, lb.elems)
                la = lb = None
            else:
                ok = False
        for lay, r, which in ((la, ra, "a"), (lb, rb, "b")):
            if lay is None:
                continue
            if which == "a" and lay.axis == r - 2:
                cand = Layout(ro - 2, ro, lay.elems)
            elif which == "b" and lay.axis == r - 1:
                cand = Layout(ro - 1, ro, lay.elems)
            elif lay.axis < r - 2:
                other = self.shape(b if which == "a" else a)
                other_r = rb if which == "a" else ra
                out_axis = lay.axis + (ro - r)
                o_axis = out_axis - (ro - other_r)
                other_lay = lb if which == "a" else la
                if other_lay is not None and other_lay.axis == o_axis:
                    if len(other_lay.elems) != len(lay.elems):
                        ok = False
                        break
                    self.dep.tie(lay.elems, other_lay.elems)
                elif 0 <= o_axis and (other is None or other[o_axis] != 1):
                    ok = False
                    break
                cand = Layout(out_axis, ro, lay.elems)
            else:
                ok = False
                break
            if out is not None and out.axis != cand.axis:
                ok = False
                break
            out = cand
        if not ok:
            self._block_inputs(node, "MatMul of two activations with channels on incompatible axes")
            return
        self.set(node.outputs[0], out)

    # --- channel-preserving and mapping ops -------------------------------------------------------

    def _unary(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        for i in range(1, len(node.inputs)):
            if self.lay(node.inputs[i]) is not None:
                self._block_inputs(node, f"{node.op_type} parameter input carries channels")
                return
        if x is None:
            return
        if node.op_type == "Clip":
            for i in (1, 2):
                p = self.const_param(node, i)
                if i < len(node.inputs) and node.inputs[i] is not None and (p is None or p.size != 1):
                    self._block_inputs(node, "Clip bounds are not scalar constants")
                    return
        if node.op_type == "PRelu":
            self._binary(node)
            return
        self.set(node.outputs[0], x)
        for extra in node.outputs[1:]:
            if extra is not None and extra.consumers():
                self.dep.block(x.elems, f"{node.op_type} secondary output is used", node)

    def _binary(self, node: ir.Node) -> None:
        out_v = node.outputs[0]
        ro = self.rank(out_v)
        layouts = [self.lay(v) for v in node.inputs]
        ranks = [self.rank(v) for v in node.inputs]
        if ro is None or any(r is None for r in ranks):
            self._block_inputs(node, f"{node.op_type} operand of unknown rank")
            return
        # The output axis every input layout maps to (broadcasting aligns trailing axes).
        axes = {lay.axis + ro - r for lay, r in zip(layouts, ranks) if lay is not None}
        sizes = {len(lay.elems) for lay in layouts if lay is not None}
        if len(axes) != 1 or len(sizes) != 1:
            self._block_inputs(node, f"{node.op_type} operands carry channels on different axes")
            return
        out_axis = axes.pop()
        ref = next(lay for lay in layouts if lay is not None)
        for i, (v, lay, r) in enumerate(zip(node.inputs, layouts, ranks)):
            if lay is not None:
                if lay is not ref:
                    self.dep.tie(ref.elems, lay.elems)
                continue
            axis_i = out_axis - (ro - r)
            if axis_i < 0:
                continue  # broadcast over the channel axis
            shape = self.shape(v)
            dim = shape[axis_i] if shape is not None else None
            if dim == 1:
                continue
            if const_value(v) is not None and dim == len(ref.elems):
                if not self.param_cut(node, i, axis_i, ref.elems, "other"):
                    return
                continue
            self.dep.block(
                ref.elems,
                f"{node.op_type} operand {i} is not from a prunable layer "
                "(e.g. a residual stream from an input, embedding or LayerNorm)",
                node,
            )
            return
        self.set(out_v, Layout(out_axis, ro, ref.elems))

    def _op_BatchNormalization(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if x is None or x.axis != 1 or any(self.lay(v) is not None for v in node.inputs[1:]):
            self._block_inputs(node, "BatchNormalization channels are not on axis 1")
            return
        for i in range(1, 5):
            if not self.param_cut(node, i, 0, x.elems, "bn_scale" if i == 1 else "bn"):
                return
        self.set(node.outputs[0], x)

    def _op_InstanceNormalization(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if x is None or x.axis != 1:
            self._block_inputs(node, "InstanceNormalization channels are not on axis 1")
            return
        for i in (1, 2):
            if not self.param_cut(node, i, 0, x.elems, "bn_scale" if i == 1 else "bn"):
                return
        self.set(node.outputs[0], x)

    def _op_LayerNormalization(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        axis = int(self.attr(node, "axis", -1))
        if x is None:
            self._block_inputs(node, "LayerNormalization parameter carries channels")
            return
        axis = axis + x.rank if axis < 0 else axis
        if x.axis >= axis:
            self._block_inputs(node, "LayerNormalization normalizes over the channel axis")
            return
        self.set(node.outputs[0], x)

    def _softmax_like(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        default = -1 if self.dep.opset >= 13 else 1
        axis = int(self.attr(node, "axis", default))
        axis = axis + x.rank if axis < 0 else axis
        if x.axis == axis or (self.dep.opset < 13 and x.axis >= axis):
            self._block_inputs(node, f"{node.op_type} normalizes over the channel axis")
            return
        self.set(node.outputs[0], x)

    _op_Softmax = _op_LogSoftmax = _op_Hardmax = _softmax_like

    def _axes(self, node: ir.Node, input_index: int, attr: str = "axes") -> list[int] | None:
        if self.attr(node, attr) is not None:
            return [int(a) for a in self.attr(node, attr)]
        if input_index < len(node.inputs) and node.inputs[input_index] is not None:
            arr = const_value(node.inputs[input_index])
            return None if arr is None else [int(a) for a in arr.ravel()]
        return []

    def _reduce(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if any(self.lay(v) is not None for v in node.inputs[1:]):
            self._block_inputs(node, f"{node.op_type} axes carry channels")
            return
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [int(self.attr(node, "axis", 0))]
        else:
            axes = self._axes(node, 1)
        if axes is None:
            self._block_inputs(node, f"{node.op_type} axes are computed at run time")
            return
        if not axes and not int(self.attr(node, "noop_with_empty_axes", 0)):
            axes = list(range(x.rank))
        axes = [a + x.rank if a < 0 else a for a in axes]
        if x.axis in axes:
            self._block_inputs(node, f"{node.op_type} reduces over the channel axis")
            return
        keep = int(self.attr(node, "keepdims", 1))
        axis = x.axis if keep else x.axis - sum(a < x.axis for a in axes)
        self.set(node.outputs[0], Layout(axis, x.rank if keep else x.rank - len(axes), x.elems))

    def _op_Transpose(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        perm = self.attr(node, "perm")
        perm = list(perm) if perm is not None else list(reversed(range(x.rank)))
        self.set(node.outputs[0], dataclasses.replace(x, axis=perm.index(x.axis)))

    def _op_Squeeze(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        axes = self._axes(node, 1)
        shape = self.shape(node.inputs[0])
        if axes is None:
            self._block_inputs(node, "Squeeze axes are computed at run time")
            return
        if not axes:
            if shape is None:
                self._block_inputs(node, "Squeeze without axes on a tensor of unknown shape")
                return
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = [a + x.rank if a < 0 else a for a in axes]
        if x.axis in axes:
            self._block_inputs(node, "Squeeze removes the channel axis")
            return
        self.set(node.outputs[0], Layout(x.axis - sum(a < x.axis for a in axes), x.rank - len(axes), x.elems))

    def _op_Unsqueeze(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        axes = self._axes(node, 1)
        if not axes:
            self._block_inputs(node, "Unsqueeze axes are computed at run time")
            return
        out_rank = x.rank + len(axes)
        axes = sorted(a + out_rank if a < 0 else a for a in axes)
        kept = [i for i in range(out_rank) if i not in axes]
        self.set(node.outputs[0], Layout(kept[x.axis], out_rank, x.elems))

    def _op_Concat(self, node: ir.Node) -> None:
        out = node.outputs[0]
        ro = self.rank(out)
        if ro is None:
            self._block_inputs(node, "Concat of unknown rank")
            return
        axis = int(self.attr(node, "axis", 0))
        axis = axis + ro if axis < 0 else axis
        layouts = [self.lay(v) for v in node.inputs]
        if all(lay is None or lay.axis == axis for lay in layouts):
            parts = []
            for v, lay in zip(node.inputs, layouts):
                if lay is not None:
                    parts.append(lay.elems)
                    continue
                shape = self.shape(v)
                size = shape[axis] if shape is not None else None
                if not isinstance(size, int):
                    self._block_inputs(node, "Concat input of unknown size on the channel axis")
                    return
                filler = self.dep.new_space(None, v, size, filler=True)
                parts.append(filler.elems)
            self.set(out, Layout(axis, ro, np.concatenate(parts)))
            return
        # Concat along another axis: every input must carry the same channels.
        if any(lay is None for lay in layouts) or len({lay.axis for lay in layouts}) != 1:
            self._block_inputs(node, "Concat along another axis of inputs with different channels")
            return
        if len({len(lay.elems) for lay in layouts}) != 1:
            self._block_inputs(node, "Concat inputs with different channel counts")
            return
        for lay in layouts[1:]:
            self.dep.tie(layouts[0].elems, lay.elems)
        self.set(out, layouts[0])

    def _op_Split(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if len(node.inputs) > 1 and self.lay(node.inputs[1]) is not None:
            self._block_inputs(node, "Split sizes carry channels")
            return
        axis = int(self.attr(node, "axis", 0))
        axis = axis + x.rank if axis < 0 else axis
        outs = list(node.outputs)
        if axis != x.axis:
            for o in outs:
                self.set(o, x)
            return
        split = self.attr(node, "split")
        if split is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            arr = const_value(node.inputs[1])
            if arr is None:
                self._block_inputs(node, "Split sizes are computed at run time")
                return
            split = arr.ravel().tolist()
        n = len(x.elems)
        if split is None:
            k = len(outs)
            chunk = -(-n // k)
            split = [min(chunk, n - i * chunk) for i in range(k)]
        split = [int(s) for s in split]
        if sum(split) != n or len(split) != len(outs):
            self._block_inputs(node, "Split sizes do not match the channels")
            return
        offset = 0
        for i, (o, s) in enumerate(zip(outs, split)):
            part = x.elems[offset : offset + s]
            offset += s
            self.dep.cut("split", node, None, i, part)
            if o is not None:
                self.set(o, Layout(x.axis, x.rank, part))

    def _op_Slice(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if any(self.lay(v) is not None for v in node.inputs[1:]):
            self._block_inputs(node, "Slice parameters carry channels")
            return
        if self.dep.opset < 10:
            axes, starts, ends, steps = self.attr(node, "axes"), self.attr(node, "starts"), self.attr(node, "ends"), None
        else:
            starts, ends = (const_value(node.inputs[i]) for i in (1, 2))
            axes = const_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            steps = const_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
            if axes is not None and x.axis not in [int(a) % x.rank for a in np.asarray(axes).ravel()]:
                self.set(node.outputs[0], x)  # another axis is sliced, whatever its bounds
                return
            if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
                chunk = self._chunk(node.inputs[0])
                part = chunk.part_of.get(id(node)) if chunk.ok else None
                if part is not None:
                    self.set(node.outputs[0], Layout(x.axis, x.rank, chunk.blocks[part].copy()))
                    return
                self._block_inputs(node, "Slice bounds are computed at run time"
                                   + (f" ({chunk.reason})" if chunk.reason and chunk.slices else ""))
                return
        starts = list(np.asarray(starts).ravel())
        ends = list(np.asarray(ends).ravel())
        axes = list(range(len(starts))) if axes is None else [int(a) for a in np.asarray(axes).ravel()]
        axes = [a + x.rank if a < 0 else a for a in axes]
        if x.axis in axes:
            i = axes.index(x.axis)
            step = 1 if steps is None else int(np.asarray(steps).ravel()[i])
            if not (int(starts[i]) == 0 and int(ends[i]) >= len(x.elems) and step == 1):
                self._block_inputs(node, "Slice cuts the channel axis")
                return
        self.set(node.outputs[0], x)

    def _chunk(self, x_value: ir.Value) -> Chunk:
        """The equal channel chunk of ``x_value`` (memoized); on success position ``j`` of every part
        is tied, so every part loses the same channels (as the blocks of a grouped Conv)."""
        chunk = self.chunks.get(x_value)
        if chunk is None:
            layout = self.lay(x_value)
            if layout is None or layout.tiled:
                chunk = Chunk(reason="no channel layout")
            else:
                chunk = find_chunk(x_value, layout, self.shape(x_value), self.dep.opset)
            if chunk.ok:
                chunk.blocks = layout.elems.reshape(chunk.parts, -1)
                for row in chunk.blocks[1:]:
                    self.dep.tie(chunk.blocks[0], row)
            self.chunks[x_value] = chunk
        return chunk

    def _op_Gather(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if x is None or self.lay(node.inputs[1]) is not None:
            self._block_inputs(node, "Gather indices carry channels")
            return
        axis = int(self.attr(node, "axis", 0))
        axis = axis + x.rank if axis < 0 else axis
        ri = self.rank(node.inputs[1])
        if axis == x.axis or ri is None:
            self._block_inputs(node, "Gather selects along the channel axis")
            return
        new_axis = x.axis if x.axis < axis else x.axis + ri - 1
        self.set(node.outputs[0], Layout(new_axis, x.rank + ri - 1, x.elems))

    def _op_Pad(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if any(self.lay(v) is not None for v in node.inputs[1:]):
            self._block_inputs(node, "Pad parameters carry channels")
            return
        pads = self.attr(node, "pads")
        if pads is None and len(node.inputs) > 1:
            pads = const_value(node.inputs[1])
        axes = None
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            axes = const_value(node.inputs[3])
            if axes is None:
                self._block_inputs(node, "Pad axes are computed at run time")
                return
        if pads is None:
            self._block_inputs(node, "Pad amounts are computed at run time")
            return
        pads = [int(p) for p in np.asarray(pads).ravel()]
        axes = list(range(x.rank)) if axes is None else [int(a) + x.rank if a < 0 else int(a) for a in np.ravel(axes)]
        n = len(axes)
        if x.axis in axes:
            i = axes.index(x.axis)
            if pads[i] != 0 or pads[i + n] != 0:
                self._block_inputs(node, "Pad pads the channel axis")
                return
        self.set(node.outputs[0], x)

    def _op_Resize(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if any(self.lay(v) is not None for v in node.inputs[1:]):
            self._block_inputs(node, f"{node.op_type} parameters carry channels")
            return
        scales_idx, sizes_idx = (1, None) if node.op_type == "Upsample" or self.dep.opset < 11 else (2, 3)
        if node.op_type == "Upsample" and self.attr(node, "scales") is not None:
            scales = np.asarray(self.attr(node, "scales"))
        else:
            scales = self.const_param(node, scales_idx)
        if scales is not None and scales.size:
            if scales.ravel()[x.axis] != 1:
                self._block_inputs(node, "Resize scales the channel axis")
                return
        elif sizes_idx is not None and sizes_idx < len(node.inputs) and node.inputs[sizes_idx] is not None:
            sizes = const_value(node.inputs[sizes_idx])
            if sizes is None or self.attr(node, "axes") is not None:
                self._block_inputs(node, "Resize sizes are computed at run time")
                return
            self.dep.cut("shape", node, node.inputs[sizes_idx], x.axis, x.elems, input_index=sizes_idx)
        else:
            self._block_inputs(node, "Resize scales are computed at run time")
            return
        self.set(node.outputs[0], x)

    _op_Upsample = _op_Resize

    def _op_Shape(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        chunk = self._chunk(node.inputs[0])
        if chunk.ok and id(node) in chunk.shape_nodes:
            return  # read only by the bounds of an equal channel chunk: they recompute after pruning
        reason = "the channel count is read by Shape"
        if chunk.slices and id(node) in chunk.shape_nodes:
            reason += f" (for Slice bounds: {chunk.reason})"
        start = int(self.attr(node, "start", 0))
        end = self.attr(node, "end")
        start = start + x.rank if start < 0 else start
        end = x.rank if end is None else (int(end) + x.rank if int(end) < 0 else min(int(end), x.rank))
        if not start <= x.axis < end:
            return  # the channel count is not read
        # Only dims other than the channel axis may be read (Gather of constant indices), or a Slice
        # whose channel-count entry is later used where that Reshape puts the same channels.
        reads = {}
        for user in node.outputs[0].consumers():
            if user.op_type == "Slice":
                span = _slice_span(user, end - start)
                if span is not None:
                    lo, hi = span
                    if lo <= x.axis - start < hi:
                        reads[user.outputs[0]] = (x.elems, x.axis - start - lo, node)
                    continue
            idx = const_value(user.inputs[1]) if user.op_type == "Gather" and len(user.inputs) > 1 else None
            if idx is None or x.axis - start in [int(i) if i >= 0 else int(i) + end - start for i in idx.ravel()]:
                self._block_inputs(node, reason)
                return
        self.shape_reads.update(reads)

    def _op_CastLike(self, node: ir.Node) -> None:
        # Input 1 only gives the type.
        if self.lay(node.inputs[0]) is not None:
            self._unary(node)


def analyze(model: ir.Model, protect: list[str] | tuple[str, ...] = ()) -> Dependency:
    """Channel dependency groups of ``model``'s main graph (see the module docstring)."""
    return _Sweep(model, set(protect)).run()


__all__ = ["Cut", "Dependency", "Group", "Layout", "Space", "UnionFind", "analyze", "infer_shapes",
           "static_value"]
