"""What is in a model: interface, op histogram, parameters, bytes and estimated FLOPs.

:func:`quick_stats` is cheap (one walk over nodes and tensor headers, no data read, no shape
inference) so the pass manager can call it before and after every pass. :func:`summarize` is
the full picture for ``onnxforge info`` and the report.

FLOPs count multiply-accumulates of the compute-heavy ops, times two:

* Conv: ``N * M * prod(out_spatial) * (C / group) * prod(kernel)`` MACs (output ``[N, M, ...]``,
  weight ``[M, C/group, *kernel]``); ConvInteger and QLinearConv likewise.
* ConvTranspose: ``N * C * prod(in_spatial) * (M / group) * prod(kernel)`` MACs (input
  ``[N, C, ...]``, weight ``[C, M/group, *kernel]``).
* MatMul (and MatMulInteger, QLinearMatMul): ``prod(output) * K``; Gemm: ``M * N * K``;
  com.microsoft MatMulNBits: ``prod(A[:-1]) * N * K``.
* LSTM (and com.microsoft DynamicQuantizeLSTM): ``T * N * directions * 4H * (I + H)`` MACs (input
  ``[T, N, I]``, ``hidden_size`` H): the gate GEMMs of every step.

Biases, activations and elementwise ops are not counted. ``dim_values`` (``inspect --dim
height=320``) gives symbolic input dimensions a size: the shapes of every value are then re-derived
by ONNX shape inference from those sizes, so a detector with symbolic H/W is counted at the size it
runs at. Shape arithmetic that ONNX's data propagation does not follow (TorchScript's ``chunk``:
``Shape -> Gather -> Div -> Slice``) is folded into constants on a private copy between rounds of
shape inference, so the shapes after it are known too. Symbolic dimensions left without a size count
as 1 (``symbolic_dims_as_one``); when a needed shape is unknown the node is left out and
``flops_exact`` is False.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir import serde

from onnxforge.ir.graph import all_graphs, iter_tensors
from onnxforge.ir.io import SOURCE_PATH_KEY

__all__ = ["ModelSummary", "TensorInfo", "quick_stats", "summarize", "symbolic_names"]

Dim = int | str | None

_FLOP_OPS = {
    ("", "Conv"),
    ("", "ConvTranspose"),
    ("", "Gemm"),
    ("", "MatMul"),
    ("", "ConvInteger"),
    ("", "QLinearConv"),
    ("", "MatMulInteger"),
    ("", "QLinearMatMul"),
    ("com.microsoft", "MatMulNBits"),
    ("", "LSTM"),
    ("com.microsoft", "DynamicQuantizeLSTM"),
}


@dataclasses.dataclass
class TensorInfo:
    """A graph input or output: name, element type and shape (symbolic dims by name)."""

    name: str
    dtype: str | None
    shape: list[Dim] | None

    def shape_str(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclasses.dataclass
class ModelSummary:
    """The numbers that describe a model. ``to_dict()`` is JSON-ready."""

    ir_version: int
    producer: str
    opset_imports: dict[str, int]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    node_count: int
    graph_count: int
    function_count: int
    initializer_count: int
    param_count: int
    param_bytes: int
    external_data_bytes: int
    file_size: int | None
    flops: int
    flops_exact: bool
    flops_by_op: dict[str, int]
    symbolic_dims_as_one: bool
    flops_unknown_nodes: list[str] = dataclasses.field(default_factory=list)
    dim_values: dict[str, int] = dataclasses.field(default_factory=dict)
    symbolic_counted: list[str] = dataclasses.field(default_factory=list)  # dim names counted as 1

    def to_dict(self) -> dict[str, Any]:
        """All fields, plus :func:`quick_stats`' keys (``nodes``, ``params``) for easy diffs."""
        data = dataclasses.asdict(self)
        data["nodes"] = self.node_count
        data["params"] = self.param_count
        return data

    def render(self, console: Any = None, *, title: str = "Model summary", top_ops: int = 25) -> None:
        """Print the summary as rich tables on ``console`` (a new ``rich.console.Console`` if None)."""
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        if console is None:
            import sys

            # Not a terminal: no window to fit, so do not cut cells to 80 columns.
            console = Console(width=None if sys.stdout.isatty() else 200)
        overview = Table(title=title, show_header=False)
        overview.add_column("key", style="bold")
        overview.add_column("value")
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opset_imports.items()))
        rows = [
            ("producer", self.producer or "-"),
            ("IR version", str(self.ir_version)),
            ("opsets", opsets),
            ("nodes", f"{self.node_count:,}"
             + (f" in {self.graph_count} graphs" if self.graph_count > 1 else "")),
            ("parameters", f"{self.param_count:,}"),
            ("parameter bytes", _human_bytes(self.param_bytes)),
        ]
        if self.external_data_bytes:
            rows.append(("external data", _human_bytes(self.external_data_bytes)))
        if self.file_size is not None:
            rows.append(("file size", _human_bytes(self.file_size)))
        flops = _human_count(self.flops) + "FLOPs"
        notes = []
        if not self.flops_exact:
            notes.append(f"lower bound: {len(self.flops_unknown_nodes)} node(s) with unknown shapes")
        if self.dim_values:
            notes.append("with " + ", ".join(f"{k}={v}" for k, v in self.dim_values.items()))
        if self.symbolic_dims_as_one:
            # A symbolic batch (leading axis) at 1 is a per-sample count; a symbolic H/W at 1 is wrong.
            sizes = list(dict.fromkeys(d for info in self.inputs for axis, d in enumerate(info.shape or [])
                                       if axis > 0 and isinstance(d, str)))
            input_dims = {d for info in self.inputs for d in info.shape or [] if isinstance(d, str)}
            derived = [n for n in self.symbolic_counted if n not in input_dims]
            if sizes:
                notes.append("symbolic dims counted as 1: give sizes with "
                             + " ".join(f"--dim {n}=N" for n in sizes))
            elif derived and self.dim_values:
                notes.append(f"lower bound: shape inference could not derive {len(derived)} dim(s) from these "
                             "sizes (counted as 1)")
            else:
                notes.append("symbolic batch counted as 1: per sample")
            # (derived dims without sizes given are unk__N names from a symbolic batch: also per sample)
        rows.append(("FLOPs (est.)", flops + (f" ({'; '.join(notes)})" if notes else "")))
        for key, value in rows:
            overview.add_row(key, escape(value))
        console.print(overview)

        io_table = Table(title="Inputs and outputs")
        io_table.add_column("kind")
        io_table.add_column("name")
        io_table.add_column("dtype")
        io_table.add_column("shape")
        for kind, infos in (("input", self.inputs), ("output", self.outputs)):
            for info in infos:
                io_table.add_row(kind, escape(info.name), info.dtype or "?", escape(info.shape_str()))
        console.print(io_table)

        ops = Table(title="Operators")
        ops.add_column("op")
        ops.add_column("count", justify="right")
        ops.add_column("FLOPs", justify="right")
        items = list(self.op_histogram.items())
        for op, count in items[:top_ops]:
            f = self.flops_by_op.get(op)
            ops.add_row(escape(op), str(count), _human_count(f) if f else "")
        if len(items) > top_ops:
            rest = sum(c for _, c in items[top_ops:])
            ops.add_row(f"... {len(items) - top_ops} more", str(rest), "")
        console.print(ops)


# --------------------------------------------------------------------------- cheap stats


# int64 tensors hold shapes, axes, indices and pads (ONNX's index type), not weights; quantized
# weights (int8/uint8/int4), their int32 biases and every float type are parameters.
_NOT_PARAM_DTYPES = frozenset(
    {
        ir.DataType.STRING,
        ir.DataType.BOOL,
        ir.DataType.UNDEFINED,
        ir.DataType.INT64,
        ir.DataType.UINT64,
    }
)


def _is_param_dtype(dtype: ir.DataType) -> bool:
    return dtype not in _NOT_PARAM_DTYPES


def _param_tensors(model: ir.Model) -> tuple[int, int, int, int]:
    """(params, param_bytes, initializer_count, external_bytes) without reading tensor data."""
    params = nbytes = inits = external = 0
    for _graph, owner, attr_name, tensor in iter_tensors(model):
        if attr_name == "":
            inits += 1
        if isinstance(tensor, ir.ExternalTensor):
            external += tensor.nbytes
        if not _is_param_dtype(tensor.dtype):
            continue
        if isinstance(owner, ir.Node) and owner.op_type != "Constant":
            continue  # e.g. ConstantOfShape's fill value: not a parameter
        params += tensor.size
        nbytes += tensor.nbytes
    for graph in all_graphs(model):
        for node in graph:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            # value_int(s) are int64: shapes and axes, not parameters (see _NOT_PARAM_DTYPES).
            for name, attr in node.attributes.items():
                if attr.is_ref():
                    continue
                if name == "value_float":
                    params += 1
                    nbytes += 4
                elif name == "value_floats":
                    params += len(attr.value)
                    nbytes += 4 * len(attr.value)
    return params, nbytes, inits, external


def quick_stats(model: ir.Model) -> dict[str, int]:
    """``{"nodes", "params", "param_bytes"}``: cheap (no data read, no shape inference).

    ``nodes`` counts nodes in every graph (subgraphs and function bodies included).
    ``params`` counts elements of initializers and Constant-node tensors of float and small
    integer types (int8/uint8/int4/int16/int32...); int64 tensors (shapes, axes, indices),
    bools and strings are not parameters. ``param_bytes`` is their storage size.
    """
    nodes = sum(len(graph) for graph in all_graphs(model))
    params, nbytes, _inits, _external = _param_tensors(model)
    return {"nodes": nodes, "params": params, "param_bytes": nbytes}


# --------------------------------------------------------------------------- summary


def _op_key(node: ir.Node) -> str:
    domain = node.domain
    if domain in ("", "ai.onnx"):
        return node.op_type
    return f"{domain}::{node.op_type}"


def _dims_from_ir(shape: ir.Shape | None) -> list[Dim] | None:
    if shape is None:
        return None
    dims: list[Dim] = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d if d >= 0 else None)  # some exporters (paddle2onnx) write -1 for "dynamic"
        else:
            value = getattr(d, "value", None)
            dims.append(None if value is None else str(value))
    return dims


def _tensor_info(value: ir.Value) -> TensorInfo:
    dtype = value.dtype.name.lower() if value.dtype is not None else None
    return TensorInfo(value.name or "", dtype, _dims_from_ir(value.shape))


def _dims_from_proto(type_proto: onnx.TypeProto) -> list[Dim] | None:
    if not type_proto.HasField("tensor_type"):
        return None
    tensor_type = type_proto.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value if d.dim_value >= 0 else None)  # -1: paddle2onnx's "dynamic"
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def symbolic_names(inputs: Sequence[TensorInfo]) -> list[str]:
    """The symbolic dimension names of the graph inputs, in order of appearance."""
    names: dict[str, None] = {}
    for info in inputs:
        for d in info.shape or []:
            if isinstance(d, str):
                names[d] = None
    return list(names)


def _fix_input_dims(proto: onnx.ModelProto, dim_values: dict[str, int],
                    input_shapes: dict[str, Sequence[int]] | None = None) -> None:
    """Give the symbolic input dims their sizes (1 for those not named, as they are counted; every dim
    of an input ``input_shapes`` gives whole) and forget every derived shape, so that shape inference
    recomputes them all from the inputs (a stale "s0//2" would otherwise win)."""
    graph = proto.graph
    input_shapes = input_shapes or {}
    for vi in graph.input:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            given = input_shapes.get(vi.name)
            dims = vi.type.tensor_type.shape.dim
            if given is not None and len(given) == len(dims):
                for d, n in zip(dims, given):
                    d.dim_value = int(n)
                continue
            for d in dims:
                if d.HasField("dim_param"):
                    d.dim_value = dim_values.get(d.dim_param, 1)  # clears dim_param (a oneof)
    del graph.value_info[:]
    for vi in graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")


# Shape arithmetic (TorchScript's chunk/upsample: Shape -> Gather -> Div -> Unsqueeze -> Slice ends) that
# ONNX's data propagation does not follow (it stops at Div): with every input size fixed these are
# constants, folded here on the summary's private copy so that shape inference can go on past them.
_SHAPE_MATH = {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Add", "Sub", "Mul", "Div",
               "Identity", "Floor", "Ceil", "Constant"}
_MAX_FOLDED = 64  # elements: shape vectors, not weights


def _shape_math(node: onnx.NodeProto, ins: list, static: dict[str, list[Dim]]):
    """numpy value of one shape-arithmetic node, or None."""
    import numpy as np
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "Constant":
        if "value" in attrs:
            return numpy_helper.to_array(attrs["value"])
        for key, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32),
                           ("value_floats", np.float32)):
            if key in attrs:
                return np.asarray(attrs[key], dtype)
        return None
    if op == "Shape":
        dims = static.get(node.input[0])
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return np.asarray(dims, np.int64)[attrs.get("start", 0):attrs.get("end", len(dims)) or None]
    if any(v is None for v in ins):
        return None
    if op == "Identity":
        return ins[0]
    if op == "Gather":
        return np.take(ins[0], ins[1], axis=attrs.get("axis", 0))
    if op == "Concat":
        return np.concatenate(ins, axis=attrs.get("axis", 0))
    if op in ("Unsqueeze", "Squeeze"):
        axes = [int(a) for a in (ins[1] if len(ins) > 1 else attrs.get("axes", []))]
        if op == "Squeeze":
            return np.squeeze(ins[0], axis=tuple(axes) if axes else None)
        out = ins[0]
        rank = out.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Cast":
        return ins[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Slice":
        data, starts, ends = ins[0], ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 else range(len(starts))
        steps = ins[4] if len(ins) > 4 else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for a, b, e, st in zip(axes, starts, ends, steps):
            index[int(a)] = slice(int(b), int(e), int(st))
        return data[tuple(index)]
    if op in ("Floor", "Ceil"):
        return (np.floor if op == "Floor" else np.ceil)(ins[0])
    a, b = ins[0], ins[1]
    if op == "Div" and np.issubdtype(a.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer Div truncates
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b).astype(a.dtype)


def _infer_with_shape_folding(proto: onnx.ModelProto, max_rounds: int = 8) -> onnx.ModelProto:
    """Shape inference, alternating with folding the main graph's shape arithmetic into constants."""
    from onnx import numpy_helper

    for _ in range(max_rounds):
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        graph = inferred.graph
        static = {vi.name: _dims_from_proto(vi.type) for vi in list(graph.input) + list(graph.value_info)}
        known = {t.name: numpy_helper.to_array(t) for t in graph.initializer
                 if math.prod(t.dims) <= _MAX_FOLDED and t.data_location != onnx.TensorProto.EXTERNAL}
        folded = {}
        for node in graph.node:
            if node.op_type not in _SHAPE_MATH or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
                continue
            if node.output[0] in known:
                continue
            try:
                value = _shape_math(node, [known.get(i) if i else None for i in node.input], static)
            except Exception:  # an op form this little evaluator does not know: leave it to inference
                value = None
            if value is not None and value.size <= _MAX_FOLDED:
                known[node.output[0]] = folded[node.output[0]] = value
        if not folded:
            return inferred
        keep = [n for n in graph.node if not (len(n.output) == 1 and n.output[0] in folded)]
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in folded.items())
        del graph.value_info[:]
        proto = inferred
    return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)


def _inferred_shapes(model: ir.Model, dim_values: dict[str, int] | None = None,
                     input_shapes: dict[str, Sequence[int]] | None = None) -> dict[str, list[Dim]]:
    """Shapes by value name from onnx's shape inference on a serialized copy (no data read).

    External tensors stay references in the copy, so a multi-GB model serializes cheaply.
    Returns {} when inference fails (the summary then reports ``flops_exact=False``).
    """
    try:
        proto = serde.serialize_model(model)
        if dim_values or input_shapes:
            _fix_input_dims(proto, dim_values or {}, input_shapes)
        inferred = _infer_with_shape_folding(proto)
    except Exception:
        return {}
    shapes: dict[str, list[Dim]] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            dims = _dims_from_proto(vi.type)
            if dims is not None and vi.name not in shapes:
                shapes[vi.name] = dims
        for init in graph.initializer:
            shapes.setdefault(init.name, list(init.dims))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(inferred.graph)
    for function in inferred.functions:
        for vi in function.value_info:
            dims = _dims_from_proto(vi.type)
            if dims is not None:
                shapes.setdefault(vi.name, dims)
    return shapes


class _ShapeLookup:
    """Shapes of values: the IR's own, completed by onnx shape inference when needed."""

    def __init__(self, model: ir.Model, dim_values: dict[str, int] | None = None,
                 input_shapes: dict[str, Sequence[int]] | None = None) -> None:
        self._model = model
        self._dim_values = dict(dim_values or {})
        self._input_shapes = {k: tuple(int(n) for n in v) for k, v in (input_shapes or {}).items()}
        self._inferred: dict[str, list[Dim]] | None = None
        self.used_symbolic = False
        self.counted: dict[str, None] = {}  # symbolic dim names counted as 1, in order

    def inferred(self) -> dict[str, list[Dim]]:
        if self._inferred is None:
            self._inferred = _inferred_shapes(self._model, self._dim_values, self._input_shapes)
        return self._inferred

    def __call__(self, value: ir.Value | None) -> list[int] | None:
        if value is None:
            return None
        dims: list[Dim] | None = None
        if value.const_value is not None:
            dims = list(value.const_value.shape.numpy())
        elif (value.name or "") in self._input_shapes:
            dims = list(self._input_shapes[value.name or ""])
        elif (self._dim_values or self._input_shapes) and (value.name or "") in self.inferred():
            # Sizes given: the shapes derived from them beat the model's symbolic annotations.
            dims = list(self.inferred()[value.name or ""])
        elif value.shape is not None:
            dims = _dims_from_ir(value.shape)
        if dims is not None and self._dim_values:
            dims = [self._dim_values.get(d, d) if isinstance(d, str) else d for d in dims]
        if dims is None or any(d is None for d in dims):
            inferred = self.inferred().get(value.name or "")
            if inferred is not None and (dims is None or len(inferred) == len(dims)):
                dims = inferred if dims is None else [a if a is not None else b for a, b in zip(dims, inferred)]
        if dims is None or any(d is None for d in dims):
            return None
        out: list[int] = []
        for d in dims:
            if isinstance(d, str):
                self.used_symbolic = True
                self.counted[d] = None
                out.append(1)
            else:
                out.append(int(d))
        return out


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if i < len(node.inputs) else None


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return int(attr.value)


def _conv_macs(out_shape: Sequence[int], w_shape: Sequence[int]) -> int:
    # out [N, M, *spatial], w [M, C/group, *kernel]
    return math.prod(out_shape) * math.prod(w_shape[1:])


def _node_macs(node: ir.Node, shape: _ShapeLookup) -> int | None:
    """Multiply-accumulates of one node, or None when a needed shape is unknown."""
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_index = 3 if op == "QLinearConv" else 1
        out = shape(node.outputs[0])
        w = shape(_input(node, w_index))
        if out is None or w is None or len(w) < 2:
            return None
        return _conv_macs(out, w)
    if op == "ConvTranspose":
        x = shape(_input(node, 0))
        w = shape(_input(node, 1))
        if x is None or w is None or len(w) < 2 or len(x) < 2:
            return None
        # x [N, C, *in], w [C, M/group, *kernel]: every input element scatters into
        # (M/group) * prod(kernel) outputs.
        return math.prod(x) * math.prod(w[1:])
    if op == "Gemm":
        a = shape(_input(node, 0))
        b = shape(_input(node, 1))
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _int_attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _int_attr(node, "transB", 0) else b[1]
        return m * n * k
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shape(_input(node, 0))
        b_index = 3 if op == "QLinearMatMul" else 1
        b = shape(_input(node, b_index))
        out = shape(node.outputs[0])
        if a is None or b is None or not a:
            return None
        k = a[-1]
        if out is None:
            # Broadcasting rules for the batch dims: compute the output ourselves.
            if len(b) == 1:
                out = a[:-1]
            elif len(a) == 1:
                out = b[:-2] + b[-1:]
            else:
                batch_a, batch_b = a[:-2], b[:-2]
                n = max(len(batch_a), len(batch_b))
                batch_a = [1] * (n - len(batch_a)) + batch_a
                batch_b = [1] * (n - len(batch_b)) + batch_b
                out = [max(x, y) for x, y in zip(batch_a, batch_b)] + [a[-2], b[-1]]
        return math.prod(out) * k
    if op == "MatMulNBits":
        a = shape(_input(node, 0))
        if a is None:
            return None
        k = _int_attr(node, "K", 0)
        n = _int_attr(node, "N", 0)
        if not k or not n:
            return None
        return math.prod(a[:-1]) * n * k
    if op in ("LSTM", "DynamicQuantizeLSTM"):
        # the gate GEMMs: every step, per direction, [batch, I + H] x [I + H, 4H]
        x = shape(_input(node, 0))
        hidden = _int_attr(node, "hidden_size", 0)
        if x is None or len(x) != 3 or not hidden:
            return None
        dirs = 2 if node.attributes.get("direction") is not None and \
            node.attributes["direction"].value == "bidirectional" else 1
        return x[0] * x[1] * dirs * 4 * hidden * (x[2] + hidden)
    return None


def node_work(model: ir.Model, dim_values: dict[str, int] | None = None,
              input_shapes: dict[str, Sequence[int]] | None = None) -> tuple[list[int | None], dict[str, int]]:
    """``(MACs of every main-graph node in graph order, {value name: elements})``: ``None`` MACs and
    missing elements where a shape is unknown. ``dim_values`` sizes symbolic input dimensions by name;
    ``input_shapes`` gives graph inputs their whole shape (a feed's: also sizes unnamed and ``-1`` dims)."""
    shape = _ShapeLookup(model, dim_values, input_shapes)
    macs: list[int | None] = []
    elements: dict[str, int] = {}
    values = list(model.graph.inputs)
    for node in model.graph:
        domain = "" if node.domain == "ai.onnx" else node.domain
        macs.append(_node_macs(node, shape) if (domain, node.op_type) in _FLOP_OPS else 0)
        values += [v for v in node.outputs if v is not None]
    for v in values:
        dims = shape(v)
        if dims is not None and v.name:
            elements[v.name] = math.prod(dims)
    return macs, elements


def _file_size(model: ir.Model, path: str | os.PathLike | None) -> int | None:
    source = path if path is not None else model.meta.get(SOURCE_PATH_KEY)
    if source is None:
        return None
    try:
        size = os.path.getsize(source)
    except OSError:
        return None
    seen: set[str] = set()
    for _graph, _owner, _attr, tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            real = os.path.realpath(tensor.path)
            if real not in seen:
                seen.add(real)
                try:
                    size += os.path.getsize(real)
                except OSError:
                    pass
    return size


def summarize(model: ir.Model, *, path: str | os.PathLike | None = None,
              dim_values: dict[str, int] | None = None) -> ModelSummary:
    """Describe ``model``. ``path`` (or the path :func:`onnxforge.ir.load` recorded) gives the
    file size, external data files included. Reads no tensor data.

    ``dim_values`` sizes symbolic input dimensions by name (FLOPs and the interface's shapes use
    them); a name that is not a symbolic dimension of an input raises ``ValueError`` naming the
    ones that are.
    """
    dim_values = dict(dim_values or {})
    inputs = [_tensor_info(v) for v in model.graph.inputs]
    if dim_values:
        known = symbolic_names(inputs)
        unknown_names = [k for k in dim_values if k not in known]
        if unknown_names:
            raise ValueError(
                f"no symbolic input dimension named {', '.join(map(repr, unknown_names))}; "
                f"the model's are: {', '.join(known) or '(none: every input dimension is fixed)'}"
            )
    histogram: Counter[str] = Counter()
    flops_by_op: Counter[str] = Counter()
    unknown: list[str] = []
    shape = _ShapeLookup(model, dim_values)
    node_count = 0
    graphs = list(all_graphs(model))
    for graph in graphs:
        for node in graph:
            node_count += 1
            key = _op_key(node)
            histogram[key] += 1
            domain = "" if node.domain == "ai.onnx" else node.domain
            if (domain, node.op_type) in _FLOP_OPS:
                macs = _node_macs(node, shape)
                if macs is None:
                    unknown.append(node.name or f"{key}#{histogram[key]}")
                else:
                    flops_by_op[key] += 2 * macs
    params, nbytes, inits, external = _param_tensors(model)
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    summary = ModelSummary(
        ir_version=model.ir_version,
        producer=producer,
        opset_imports=dict(sorted(model.opset_imports.items())),
        inputs=[_sized(i, dim_values, None) for i in inputs],
        outputs=[_sized(_tensor_info(v), dim_values, shape.inferred() if dim_values else None)
                 for v in model.graph.outputs],
        op_histogram=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        node_count=node_count,
        graph_count=len(graphs),
        function_count=len(model.functions),
        initializer_count=inits,
        param_count=params,
        param_bytes=nbytes,
        external_data_bytes=external,
        file_size=_file_size(model, path),
        flops=sum(flops_by_op.values()),
        flops_exact=not unknown,
        flops_by_op=dict(sorted(flops_by_op.items(), key=lambda kv: (-kv[1], kv[0]))),
        symbolic_dims_as_one=shape.used_symbolic,
        flops_unknown_nodes=unknown,
        dim_values=dim_values,
        symbolic_counted=list(shape.counted),
    )
    if dim_values:  # input dims without a size ran as 1 in the shape inference (see _fix_input_dims)
        not_given = [n for n in symbolic_names(inputs) if n not in dim_values]
        summary.symbolic_counted = list(dict.fromkeys(not_given + summary.symbolic_counted))
        summary.symbolic_dims_as_one = bool(summary.symbolic_counted)
    return summary


def _sized(info: TensorInfo, dim_values: dict[str, int], inferred: dict[str, list[Dim]] | None) -> TensorInfo:
    """``info`` with the given sizes in place of their names (outputs: as shape inference derived them)."""
    if not dim_values or info.shape is None:
        return info
    shape = info.shape
    if inferred is not None and info.name in inferred and len(inferred[info.name]) == len(shape):
        shape = [b if b is not None else a for a, b in zip(shape, inferred[info.name])]
    return TensorInfo(info.name, info.dtype, [dim_values.get(d, d) if isinstance(d, str) else d for d in shape])


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{value:.2f} {unit} ({n:,} B)"
        value /= 1024
    return f"{n:,} B"  # pragma: no cover


def _human_count(n: int | None) -> str:
    if not n:
        return "0 "
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} "
