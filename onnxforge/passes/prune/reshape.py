"""Reshape / Flatten mapping for the channel dependency sweep: how channel elements land on the
axes of a reshaped tensor (merged into features, split into heads, folded into the batch axis), and
which run-time shape pieces must be rewritten when channels go. A mixin of :class:`.dependency._Sweep`
(it uses the sweep's ``lay``/``shape``/``set``/``_block_inputs`` and its :class:`~.groups.Dependency`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value
from onnxforge.passes.prune.groups import Layout


class ReshapeRules:
    """``Flatten`` / ``Reshape`` handling of :class:`.dependency._Sweep`."""

    def _op_Flatten(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        in_shape = self.shape(node.inputs[0])
        axis = int(self.attr(node, "axis", 1))
        axis = axis + x.rank if axis < 0 else axis
        if in_shape is None:
            self._block_inputs(node, "Flatten of a tensor of unknown shape")
            return
        out_shape = (_prod_or_none(in_shape[:axis]) if axis else 1, _prod_or_none(in_shape[axis:]))
        self._reshape_map(node, x, in_shape, out_shape, None)

    def _op_Reshape(self, node: ir.Node) -> None:
        x = self.lay(node.inputs[0])
        if self.lay(node.inputs[1]) is not None:
            self._block_inputs(node, "Reshape shape carries channels")
            return
        in_shape, out_shape = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            self._block_inputs(node, "Reshape of unknown shapes")
            return
        self._reshape_map(node, x, in_shape, out_shape, node.inputs[1])

    def _reshape_map(self, node, x: Layout, in_shape, out_shape, shape_value) -> None:
        a = x.axis
        if x.tiled:
            self._reshape_tiled(node, x, in_shape, out_shape, shape_value)
            return
        if len(in_shape) <= a or in_shape[a] != len(x.elems):
            self._block_inputs(node, f"{node.op_type}: cannot map the channel axis")
            return
        b = None
        pre = _dims_product(in_shape[:a])
        if pre is not None:
            for j in range(len(out_shape) + 1):
                if _dims_product(out_shape[:j]) == pre:
                    b = j
                    break
        if b is None or b >= len(out_shape) or not isinstance(out_shape[b], int):
            # Align from the right: when in[a:] and out[b:] are static with equal products, the
            # prefixes hold equally many elements (a Reshape keeps the total), so the suffixes map.
            b = _right_align(in_shape, out_shape, a)
        if b is None or b >= len(out_shape) or not isinstance(out_shape[b], int):
            if not self._heads_to_batch(node, x, in_shape, out_shape, shape_value):
                self._block_inputs(node, f"{node.op_type}: cannot map the channel axis")
            return
        n, d_out = len(x.elems), out_shape[b]
        if d_out == n:
            elems = x.elems
        elif d_out > n:
            inner = _int_product(in_shape[a + 1 :])
            # Merge: [.., C, H, W, ..] -> [.., C*H*W, ..]; find how many following dims merge.
            k, acc = a + 1, n
            while k < len(in_shape) and isinstance(in_shape[k], int) and acc < d_out:
                acc *= in_shape[k]
                k += 1
            if acc != d_out or inner is None and k < len(in_shape):
                self._block_inputs(node, f"{node.op_type}: channel axis merges with dims of unknown size")
                return
            elems = np.repeat(x.elems, d_out // n)
        else:
            # Split: [.., D, ..] -> [.., heads, head_dim, ..]; a head is one unit.
            inner = n // d_out if n % d_out == 0 else None
            if inner is None or b + 1 >= len(out_shape) or out_shape[b + 1] != inner:
                self._block_inputs(node, f"{node.op_type}: channel axis is split in an unmapped way")
                return
            blocks = x.elems.reshape(d_out, inner)
            if shape_value is not None and self._selected_later(node.outputs[0], b):
                # A stacked projection ([.., 3E] -> [.., 3, E], then q / k / v selected along the
                # 3-axis): the channels live on the inner axis; position j of every slice is one
                # class (q_j, k_j, v_j go together; the heads tie them further downstream).
                for row in blocks[1:]:
                    self.dep.tie(blocks[0], row)
                if self._shape_cut(node, shape_value, b + 1, blocks[0], keep_axis=False):
                    self.set(node.outputs[0], Layout(b + 1, len(out_shape), blocks[0].copy()))
                return
            for row in blocks:
                for e in row[1:].tolist():
                    self.dep.uf.union(int(row[0]), e)
            elems = blocks[:, 0].copy()
        if shape_value is not None:
            if not self._shape_cut(node, shape_value, b, elems, keep_axis=(b == a and d_out == n)):
                return
        self.set(node.outputs[0], Layout(b, len(out_shape), elems))

    def _selected_later(self, value: ir.Value, axis: int, depth: int = 6) -> bool:
        """Whether ``axis`` of ``value`` is indexed (Gather of a constant / Split) after moving through
        Unsqueeze / Squeeze / Transpose: then its slices are different tensors, not channel units."""
        if depth == 0:
            return False
        for user in value.consumers():
            if not user.inputs or user.inputs[0] is not value:
                continue
            op, rank = user.op_type, self.rank(value)
            if op in ("Gather", "Split"):
                if int(self.attr(user, "axis", 0)) % max(rank or 1, 1) == axis:
                    if op == "Split" or const_value(user.inputs[1]) is not None:
                        return True
                continue
            if op == "Transpose":
                perm = self.attr(user, "perm")
                new = list(perm).index(axis) if perm is not None else None
            elif op in ("Unsqueeze", "Squeeze"):
                axes = self._axes(user, 1)
                if not axes or rank is None:
                    continue
                if op == "Unsqueeze":
                    out_rank = rank + len(axes)
                    axes = sorted(a % out_rank for a in axes)
                    kept = [i for i in range(out_rank) if i not in axes]
                    new = kept[axis]
                else:
                    axes = [a % rank for a in axes]
                    new = None if axis in axes else axis - sum(a < axis for a in axes)
            else:
                continue
            if new is not None and self._selected_later(user.outputs[0], new, depth - 1):
                return True
        return False

    def _heads_to_batch(self, node, x: Layout, in_shape, out_shape, shape_value) -> bool:
        """``[.., B, H*d] -> [.., B*H, d]`` (split heads into the batch axis; torch's
        MultiheadAttention): a head is one unit and the merged axis is a *tiled* layout.
        ``[.., B, H, ..] -> [.., B*H, ..]`` (merge heads into the batch axis) likewise."""
        a, n, r = x.axis, len(x.elems), len(in_shape)
        if shape_value is None or a < 1:
            return False
        if _dims_product(in_shape[: a - 1]) is None:
            return False
        if len(out_shape) == r and out_shape[: a - 1] == in_shape[: a - 1] and a == r - 1:
            d = out_shape[a]
            if not isinstance(d, int) or d <= 0 or n % d or n == d:
                return False
            blocks = x.elems.reshape(n // d, d)
            if not self._merged_cut(node, shape_value, a - 1, x.elems):
                return True
            for row in blocks:
                for e in row[1:].tolist():
                    self.dep.uf.union(int(row[0]), e)
            self.set(node.outputs[0], Layout(a - 1, r, blocks[:, 0].copy(), tiled=True))
            return True
        if len(out_shape) == r - 1 and out_shape[: a - 1] == in_shape[: a - 1] and out_shape[a:] == in_shape[a + 1:] \
                and all(isinstance(dim, int) for dim in in_shape[a + 1:]):
            if self._merged_cut(node, shape_value, a - 1, x.elems):
                self.set(node.outputs[0], Layout(a - 1, r - 1, x.elems, tiled=True))
            return True
        return False

    def _reshape_tiled(self, node, x: Layout, in_shape, out_shape, shape_value) -> None:
        """``[.., B*H, ..] -> [.., B, H, ..]``: the heads come back on their own axis."""
        a, n = x.axis, len(x.elems)
        if (shape_value is not None and len(out_shape) == len(in_shape) + 1 and out_shape[:a] == in_shape[:a]
                and out_shape[a + 2:] == in_shape[a + 1:] and out_shape[a + 1] == n
                and all(isinstance(dim, int) for dim in in_shape[a + 1:])):
            if self._shape_cut(node, shape_value, a + 1, x.elems, keep_axis=False):
                self.set(node.outputs[0], Layout(a + 1, len(out_shape), x.elems))
            return
        self._block_inputs(node, "attention heads merged with the batch axis are reshaped in an unmapped way")

    def _merged_cut(self, node: ir.Node, shape_value: ir.Value, index: int, elems: np.ndarray) -> bool:
        """Entry ``index`` of a Reshape shape is ``batch * heads``: it must become ``-1`` (inferred)."""
        arr = const_value(shape_value)
        if arr is not None:
            entries = [int(v) for v in arr.ravel()]
            if entries[index] == -1:
                return True
            if -1 not in entries and (entries[index] != 0 or int(self.attr(node, "allowzero", 0))):
                self.dep.cut("infer", node, shape_value, index, elems, input_index=1)
                return True
        else:
            producer = shape_value.producer()
            if producer is not None and producer.op_type == "Concat" and len(shape_value.consumers()) == 1:
                pos, target, others = 0, None, []
                for k, piece in enumerate(producer.inputs):
                    ps = self.shape(piece)
                    if ps is None or len(ps) != 1 or not isinstance(ps[0], int):
                        target = None
                        break
                    if pos <= index < pos + ps[0] and ps[0] == 1:
                        target = k
                    else:
                        others.append(static_value(piece))
                    pos += ps[0]
                if target is not None and not any(o is not None and -1 in o.ravel().tolist() for o in others):
                    val = static_value(producer.inputs[target])
                    if val is None or int(val.ravel()[0]) != -1:
                        self.dep.cut("infer", producer, producer.inputs[target], 0, elems, input_index=target)
                    return True
        self.dep.block(elems, "Reshape folds heads into a batch axis computed in an unmapped way", node)
        return False

    def _shape_cut(self, node: ir.Node, shape_value: ir.Value, index: int, elems: np.ndarray, keep_axis: bool) -> bool:
        arr = const_value(shape_value)
        if arr is not None:
            entry = int(arr.ravel()[index])
            allowzero = int(self.attr(node, "allowzero", 0))
            if entry == -1 or (entry == 0 and not allowzero and keep_axis):
                return True
            if entry == 0 and not allowzero:
                self.dep.block(elems, "Reshape copies a dim that changes", node)
                return False
            self.dep.cut("shape", node, shape_value, index, elems, input_index=1)
            return True
        # A shape assembled at run time by Concat of 1-element pieces: the piece at `index` must be constant.
        producer = shape_value.producer()
        if producer is not None and producer.op_type == "Concat" and len(shape_value.consumers()) == 1:
            pos = 0
            for k, piece in enumerate(producer.inputs):
                ps = self.shape(piece)
                if ps is None or len(ps) != 1 or not isinstance(ps[0], int):
                    break
                if pos <= index < pos + ps[0]:
                    read = self.shape_reads.get(piece)
                    if read is not None and read[1] == index - pos and len(read[0]) == len(elems) and all(
                            self.dep.uf.find(int(p)) == self.dep.uf.find(int(q)) for p, q in zip(read[0], elems)):
                        # The channel count read at run time from a tensor with the same channels.
                        self.validated_reads.add((id(piece), id(producer)))
                        return True
                    val = static_value(piece)
                    if ps[0] == 1:
                        if val is not None and int(val.ravel()[0]) == -1:
                            return True
                        # A run-time piece (x.shape[i]) at a dim whose size is static: the pruned
                        # size is static too, so the piece becomes a constant.
                        self.dep.cut("shape", producer, piece, 0, elems, input_index=k)
                        return True
                    break
                pos += ps[0]
        self.dep.block(elems, "Reshape shape is computed at run time on the channel axis", node)
        return False


def _dims_product(dims) -> tuple[int, tuple] | None:
    """A dims tuple as (int product, sorted symbols) so prefixes can be compared; None if unknown."""
    n, syms = 1, []
    for d in dims:
        if d is None:
            return None
        if isinstance(d, int):
            n *= d
        else:
            syms.append(d)
    return n, tuple(sorted(syms))


def _int_product(dims) -> int | None:
    n = 1
    for d in dims:
        if not isinstance(d, int):
            return None
        n *= d
    return n


def static_value(value: ir.Value | None) -> np.ndarray | None:
    """``const_value``, or a small shape piece computed from constants by Unsqueeze/Squeeze/Cast/
    Identity/Reshape (TorchScript exports build Reshape shapes as ``Concat(Unsqueeze(Constant), ...)``)."""
    arr = const_value(value)
    if arr is not None or value is None:
        return arr
    node = value.producer()
    if node is None or node.op_type not in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return None
    x = static_value(node.inputs[0])
    if x is None or x.size > 64:
        return None
    if node.op_type == "Reshape":
        shape = const_value(node.inputs[1])
        return None if shape is None else x.reshape([int(d) for d in shape.ravel()])
    if node.op_type == "Unsqueeze":
        axes = node.attributes.get("axes")
        axes = list(axes.value) if axes is not None else (
            None if len(node.inputs) < 2 else const_value(node.inputs[1]))
        if axes is None:
            return None
        out = x
        for a in sorted(int(a) for a in np.ravel(axes)):
            out = np.expand_dims(out, a if a >= 0 else a + out.ndim + 1)
        return out
    if node.op_type == "Squeeze":
        return np.squeeze(x) if x.size == 1 else None
    return x  # Cast / Identity of an int shape piece keeps its value


def _right_align(in_shape, out_shape, a: int) -> int | None:
    """``b`` with ``prod(in_shape[a:]) == prod(out_shape[b:])``, all static; None if there is none."""
    total = _int_product(in_shape[a:])
    if total is None:
        return None
    for b in range(len(out_shape) - 1, -1, -1):
        p = _int_product(out_shape[b:])
        if p is None or p > total:
            return None
        if p == total:
            # The first (largest) such b whose dim is not 1 carries the channel axis.
            while b < len(out_shape) - 1 and out_shape[b] == 1:
                b += 1
            return b
    return None


def _slice_span(node: ir.Node, size: int) -> tuple[int, int] | None:
    """``[lo, hi)`` that a Slice (constant bounds, axis 0, step 1) of a 1-D length-``size`` tensor keeps."""
    vals = [const_value(node.inputs[i]) if len(node.inputs) > i and node.inputs[i] is not None else None
            for i in range(1, 5)]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if (axes is not None and int(axes.ravel()[0]) not in (0, -1)) or (steps is not None and int(steps.ravel()[0]) != 1):
        return None
    lo, hi = int(starts.ravel()[0]), int(ends.ravel()[0])
    lo = max(0, lo + size) if lo < 0 else min(lo, size)
    hi = max(0, hi + size) if hi < 0 else min(hi, size)
    return lo, hi


def _prod_or_none(dims):
    p = _int_product(dims)
    if p is not None:
        return p
    return dims[0] if len(dims) == 1 else None
