"""Physically remove pruned channels: slice constants, rewrite shapes, Split sizes and ``group``.

Given the classes to remove, every recorded :class:`~.dependency.Cut` keeps the positions whose
element survives: ``W' = W.take(kept, axis)`` for weights, biases and BatchNorm parameters (whether
initializers or ``Constant`` nodes), ``shape[i] = #kept`` for Reshape/Resize shape constants (a new
constant per reader, so shared shape constants stay intact), ``shape[i] = -1`` for a ``batch x heads``
entry of a Reshape that folds attention heads into the batch axis (cut kind ``infer``), new Split sizes, and ``group = #kept``
for depthwise convolutions. Shapes recorded on values whose channel axis shrank are updated so that
stale ``value_info`` cannot contradict the new weights. The result is a smaller dense model.

Also here: :class:`Costs`, the exact parameter count and multiply-accumulate FLOPs of the weighted
layers after a candidate removal (used by the global ``target_params`` / ``target_flops`` search).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value, make_initializer
from onnxforge.passes.prune.dependency import Dependency, static_value

KEPT_META = "onnxforge.prune.kept_out"
"""``node.meta`` key: indices (into the original model's channels) of the output channels a pruned
Conv/Gemm/MatMul kept. ``reconstruct`` uses it to pair student and teacher channels."""


def _masks_by_value(dep: Dependency, removed_elem: np.ndarray) -> dict[ir.Value, dict[int, np.ndarray]]:
    masks: dict[ir.Value, dict[int, np.ndarray]] = defaultdict(dict)
    for cut in dep.cuts:
        if cut.kind != "param":
            continue
        keep = ~removed_elem[cut.elems]
        prev = masks[cut.value].get(cut.axis)
        masks[cut.value][cut.axis] = keep if prev is None else (prev & keep)
    return masks


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the data of an initializer or of the ``Constant`` node producing ``value``."""
    array = np.ascontiguousarray(array)
    if value.const_value is not None:
        value.const_value = ir.Tensor(array, name=value.name)
    else:
        node = value.producer()
        assert node is not None and node.op_type == "Constant", f"{value.name} is not a constant"
        for key in list(node.attributes):
            del node.attributes[key]
        node.attributes["value"] = ir.AttrTensor("value", ir.Tensor(array, name=value.name))
    value.shape = ir.Shape(array.shape)


def apply(dep: Dependency, removed_roots: set[int] | np.ndarray) -> dict[str, int]:
    """Remove every element whose class root is in ``removed_roots``; returns counts of what changed."""
    roots = dep.roots()
    removed_elem = np.isin(roots, np.fromiter(removed_roots, dtype=np.int64, count=len(removed_roots)))
    counts = defaultdict(int)
    graph = dep.model.graph

    for value, by_axis in _masks_by_value(dep, removed_elem).items():
        if all(m.all() for m in by_axis.values()):
            continue
        arr = np.asarray(const_value(value))
        for axis, mask in sorted(by_axis.items()):
            arr = np.compress(mask, arr, axis=axis)
        set_constant(value, arr)
        counts["tensors_sliced"] += 1

    # Shape entries: a fresh constant per reader.
    shape_cuts = defaultdict(list)
    for cut in dep.cuts:
        if cut.kind in ("shape", "infer"):
            shape_cuts[(cut.node, cut.input_index)].append(cut)
    for (node, idx), cuts in shape_cuts.items():
        static = static_value(node.inputs[idx])
        # A run-time 1-element Concat piece (see dependency._shape_cut) becomes a constant.
        arr = np.zeros(1, np.int64) if static is None else np.array(static, copy=True).astype(np.int64)
        changed = False
        for cut in cuts:
            kept = int((~removed_elem[cut.elems]).sum())
            if arr.ndim == 0:
                arr = arr.reshape(1)
            if cut.kind == "infer":  # a batch x heads entry: let Reshape infer it
                if kept != len(cut.elems) and (static is None or int(arr.ravel()[cut.axis]) != -1):
                    arr.ravel()[cut.axis] = -1
                    changed = True
            elif static is None or int(arr.ravel()[cut.axis]) != kept:
                arr.ravel()[cut.axis] = kept
                changed = True
        if changed:
            base = (node.inputs[idx].name or "shape") + "_pruned"
            node.replace_input_with(idx, make_initializer(graph, base, arr))
            counts["shapes_rewritten"] += 1

    split_cuts = defaultdict(dict)
    for cut in dep.cuts:
        if cut.kind == "split":
            split_cuts[cut.node][cut.axis] = int((~removed_elem[cut.elems]).sum())
    for node, sizes_by_output in split_cuts.items():
        old = [len(c.elems) for c in dep.cuts if c.kind == "split" and c.node is node]
        sizes = np.array([sizes_by_output[i] for i in range(len(sizes_by_output))], dtype=np.int64)
        if list(sizes) == old:
            continue
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            node.replace_input_with(1, make_initializer(graph, (node.inputs[1].name or "split") + "_pruned", sizes))
        elif dep.opset >= 13:
            node.attributes.pop("num_outputs", None)
            node.resize_inputs(2)
            node.replace_input_with(1, make_initializer(graph, f"{node.name or 'split'}_sizes", sizes))
        else:
            node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
        counts["splits_rewritten"] += 1

    for cut in dep.cuts:
        if cut.kind == "group":
            kept = int((~removed_elem[cut.elems]).sum())
            if kept != len(cut.elems):
                cut.node.attributes["group"] = ir.AttrInt64("group", kept)
                counts["groups_rewritten"] += 1

    # Remember which original output channels each layer kept (composes over repeated pruning).
    for cut in dep.cuts:
        if cut.kind == "param" and cut.role in ("out_weight", "dw_weight"):
            keep = np.nonzero(~removed_elem[cut.elems])[0]
            if len(keep) == len(cut.elems):
                continue
            prior = cut.node.meta.get(KEPT_META)
            cut.node.meta[KEPT_META] = keep if prior is None else np.asarray(prior)[keep]

    for value, layout in dep.layouts.items():
        kept = int((~removed_elem[layout.elems]).sum())
        if kept == len(layout.elems):
            continue
        counts["values_reshaped"] += 1
        if value.shape is not None and len(value.shape) == layout.rank:
            dims = list(value.shape)
            dims[layout.axis] = kept
            value.shape = ir.Shape(dims)
        else:
            value.shape = None
    return dict(counts)


class Costs:
    """Parameters and FLOPs after removing a set of elements, computed from the cuts (exact)."""

    def __init__(self, dep: Dependency):
        self.dep = dep
        self.values: dict[ir.Value, tuple[tuple[int, ...], list[tuple[int, np.ndarray]]]] = {}
        by_value = defaultdict(list)
        for cut in dep.cuts:
            if cut.kind == "param":
                by_value[cut.value].append((cut.axis, cut.elems))
        for value, cuts in by_value.items():
            arr = const_value(value)
            self.values[value] = (tuple(arr.shape), cuts)
        self.total_params = 0
        for node_or_value in _float_constants(dep.model):
            self.total_params += node_or_value
        # FLOPs of weighted layers: 2 * |W| * output positions per sample.
        self.flop_layers: list[tuple[ir.Value, int]] = []
        self.fixed_flops = 0
        for node in dep.model.graph:
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
                continue
            w = const_value(node.inputs[1])
            if w is None:
                continue
            shape = dep.shapes.get(node.outputs[0].name or "") or ()
            if node.op_type == "Conv":
                positions = _known_product(shape[2:])
            elif node.op_type == "ConvTranspose":
                positions = _known_product((dep.shapes.get(node.inputs[0].name or "") or ())[2:])
            else:
                positions = _known_product(shape[1:-1]) if len(shape) > 2 else 1
            if node.inputs[1] in self.values:
                self.flop_layers.append((node.inputs[1], 2 * positions))
            else:
                self.fixed_flops += 2 * positions * int(w.size)
        self.total_flops = self.after(np.zeros(len(dep.uf.parent), dtype=bool))[1]

    def after(self, removed_elem: np.ndarray) -> tuple[int, int]:
        sizes: dict[ir.Value, int] = {}
        for value, (shape, cuts) in self.values.items():
            dims = list(shape)
            masks: dict[int, np.ndarray] = {}
            for axis, elems in cuts:
                keep = ~removed_elem[elems]
                masks[axis] = keep if axis not in masks else masks[axis] & keep
            for axis, m in masks.items():
                dims[axis] = int(m.sum())
            sizes[value] = int(np.prod(dims)) if dims else 1
        removed_params = sum(int(np.prod(shape)) - sizes[v] for v, (shape, _) in self.values.items())
        flops = self.fixed_flops + sum(mult * sizes[v] for v, mult in self.flop_layers)
        return self.total_params - removed_params, flops


def _known_product(dims) -> int:
    n = 1
    for d in dims:
        if isinstance(d, int):
            n *= d
    return n


def _float_constants(model: ir.Model):
    seen = set()
    for value in model.graph.initializers.values():
        if value.const_value is not None and value.dtype is not None and value.dtype.is_floating_point():
            seen.add(value.name)
            yield int(np.prod(value.const_value.shape))
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            t = node.attributes["value"].value
            if t.dtype.is_floating_point():
                yield int(np.prod(t.shape))


def param_count(model: ir.Model) -> int:
    """Number of floating-point weights (initializers and Constant nodes) in the main graph."""
    return sum(_float_constants(model))
