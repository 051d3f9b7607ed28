"""``quantize-dynamic``: int8 weights, activations quantized at run time (MatMul/Gemm, and LSTM).

LSTMs become onnxruntime's ``com.microsoft.DynamicQuantizeLSTM`` (int8 weights per gate row, input
and hidden states quantized by the kernel; :mod:`.recurrent`), except on target ``onnx``.

Rewrites ``Y = X @ W (+ b)`` with a constant ``W`` of shape ``[K, N]`` (Gemm: ``transB`` handled by
transposing the constant) into

* by default (standard ops): ``DynamicQuantizeLinear(X) -> (Xq, s_x, z_x)`` (one per input tensor,
  shared by every MatMul reading it, e.g. Q/K/V projections), ``MatMulInteger(Xq, Wq, z_x, z_w)``,
  ``Cast`` to float, ``Mul`` by ``s_x * s_w`` (+ ``Add b``). onnxruntime fuses this, including a
  following bias ``Add``, into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``; measured on the
  BERT-style encoder it ran as fast as onnxruntime's own quantize_dynamic output, and faster than
  emitting the contrib op directly (which keeps the bias Add separate);
* ``contrib=yes`` (onnxruntime only): ``com.microsoft.DynamicQuantizeMatMul(X, Wq, s_w, z_w, b)``.

Math: weights symmetric int8 per output column, ``s_w[n] = max_k |W[k, n]| / 127``, ``z_w = 0``,
``Wq = clip(round_half_even(W / s_w), -127, 127)``. Activations per call:
``s_x = (max(x, 0) - min(x, 0)) / 255``, ``z_x = saturate(round(-min(x, 0) / s_x))`` (uint8), then
``Y = s_x * s_w[n] * sum_k (Xq[k] - z_x) * Wq[k, n]`` with exact int32 accumulation.

Lossy: per element of ``X`` error ``<= s_x / 2``, of ``W`` ``<= s_w / 2``; no calibration data is
needed.

Streaming: weights are read one at a time (memory-mapped when external), quantized in column
chunks, the int8 result is handed to :func:`onnxforge.ir.io.spill` and the float weight is dropped
and unmapped as soon as no node reads it, so memory stays at about one weight, not the model. Convolutions are left alone on purpose: dynamic int8 Conv re-quantizes every activation at
run time without a fused kernel and made CNNs 4-8x slower on CPU; use ``quantize-int8`` for them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.errors import UnsupportedModelError
from onnxforge.ir.graph import const_tensor, const_value, replace_all_uses
from onnxforge.ir.io import release, spill
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.quantize.analysis import _attr
from onnxforge.passes.quantize.opset import upgrade_opset
from onnxforge.passes.quantize.qmath import WEIGHT_QMAX, quantize, quantize_weight, weight_qparams
from onnxforge.passes.quantize.recurrent import RECURRENT, not_quantizable, to_dynamic_lstm
from onnxforge.passes.quantize.rewrite import _Builder
from onnxforge.passes.cleanup import lift_constant_tensors
from onnxforge.passes.registry import register_pass


#: Quantizers work on column slices of about this many float64 bytes (bounded temporaries).
CHUNK_BYTES = 64 << 20


def column_chunks(rows: int, cols: int, bytes_per_element: int = 8) -> list[slice]:
    """Column slices of a ``[rows, cols]`` weight, each about :data:`CHUNK_BYTES` in float64."""
    step = max(1, CHUNK_BYTES // max(1, rows * bytes_per_element))
    return [slice(i, min(i + step, cols)) for i in range(0, cols, step)]


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove the float weights the quantized nodes replaced (nobody reads them any more)."""
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del graph.initializers[name]
            release(v.const_value)


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove (and unmap) one initializer as soon as no node reads it, so a streaming pass does not
    keep every replaced weight mapped until the end."""
    if value is None or not value.is_initializer() or value.name not in graph.initializers:
        return
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    del graph.initializers[value.name]
    release(value.const_value)


def new_initializer(b: _Builder, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer whose tensor goes to the spill file when one is active (see io.spilling)."""
    v = b.init(base, array)
    v.const_value = spill(v.const_value)
    return v


def matmul_candidates(graph: ir.Graph, exclude, min_weight_size: int, stats: PassStats) -> list[ir.Node]:
    """MatMul/Gemm nodes with a constant 2-D float32 weight of at least ``min_weight_size`` elements,
    not excluded by name or op type; every other MatMul/Gemm is reported as skipped. Reads no weight
    data (dtype and shape only): :func:`matmul_weight` reads one when its turn comes."""
    todo = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if node.name in exclude or node.op_type in exclude:
            stats.skip(node, "excluded by option 'exclude'")
            continue
        why = matmul_weight_check(node)
        if why:
            stats.skip(node, why)
            continue
        size = const_tensor(node.inputs[1]).size
        if size < min_weight_size:
            stats.skip(node, f"weight has {size} < min_weight_size={min_weight_size} elements")
            continue
        todo.append(node)
    return todo


def matmul_weight_check(node: ir.Node) -> str:
    """Why the MatMul/Gemm's weight cannot be quantized ("" when it can); reads only the bias."""
    if node.domain not in ("", "ai.onnx"):
        return "not a standard op"
    w = const_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "MatMul of two activations (attention) has no constant weight"
    if w.dtype != ir.DataType.FLOAT:
        return f"weight dtype {w.dtype.numpy()} is not float32"
    if len(w.shape) != 2:
        return f"weight rank {len(w.shape)} (only 2-D [K, N] weights)"
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with transA/alpha/beta"
        n = w.shape[0] if _attr(node, "transB", 0) else w.shape[1]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const_value(node.inputs[2])
            if b is None or b.ndim != 1 or b.shape[0] != n:
                return "Gemm bias is not a constant 1-D [N] vector"
    return ""


def matmul_weight(node: ir.Node) -> np.ndarray:
    """The ``[K, N]`` float weight of a checked MatMul/Gemm: a read-only view of the memory map for
    an external tensor (a transposed copy for Gemm ``transB``)."""
    w = const_value(node.inputs[1])
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        w = np.ascontiguousarray(w.T)
    return w


@register_pass("quantize-dynamic")
class QuantizeDynamicPass(Pass):
    """Dynamic int8 quantization of MatMul/Gemm (and LSTM): int8 per-column weights, uint8 activations at run time.

    See the module docstring for the rewrite and the math. Lossy (``tolerance``: 5% of the output
    magnitude; cosine >= 0.99 on a BERT-style encoder). Conv is skipped and reported.
    """

    lossless = False
    tolerance = 0.05

    def __init__(
        self,
        per_channel: bool = True,
        min_weight_size: int = 0,
        exclude: list[str] | None = None,
        contrib: Literal["yes", "no"] = "no",
    ):
        super().__init__()
        self.per_channel = per_channel
        self.min_weight_size = min_weight_size
        self.exclude = list(exclude or [])
        self.contrib = contrib

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        lifted = lift_constant_tensors(model)
        graph = model.graph
        # "no" by default: onnxruntime fuses the standard form better (see the module docstring).
        # There is no "auto": it used to exist and meant "no", which is what a user could not guess.
        use_contrib = self.contrib == "yes" and self.context.target != "onnx"
        for node in graph:
            if node.op_type in ("Conv", "ConvTranspose"):
                stats.skip(node, "dynamic quantization skips convolutions (it makes CNNs slower); use quantize-int8")
        old_opset = model.opset_imports.get("", 0) or 0
        if old_opset < 11 and matmul_candidates(graph, self.exclude, self.min_weight_size, PassStats()):
            # DynamicQuantizeLinear and MatMulInteger do not exist before opset 11/10: emitting
            # them into an older model would give a model onnxruntime refuses. Upgrade first: the
            # converter's fallback rebuilds the graph, so nodes found before it would be stale.
            if not upgrade_opset(model, 13, stats):
                raise UnsupportedModelError(
                    f"quantize-dynamic needs opset >= 11 (DynamicQuantizeLinear); the model has opset "
                    f"{old_opset} and upgrading it failed: "
                    f"{stats.notes[-1] if stats.notes else 'unknown reason'}. Convert it with "
                    "onnxscript's version_converter (or re-export at a newer opset) first"
                )
            graph = model.graph
        todo = matmul_candidates(graph, self.exclude, self.min_weight_size, stats)
        lstms = self._lstm_candidates(graph, stats)
        if not todo and not lstms:
            return bool(lifted)
        if use_contrib:
            model.opset_imports.setdefault("com.microsoft", 1)
        b = _Builder(graph)
        for node in lstms:
            to_dynamic_lstm(graph, node, b)
            stats.count("dynamic_LSTM")
        shared_dql: dict[int, ir.Node] = {}
        for node in todo:
            weight_v = node.inputs[1]
            wq, scale = self._quantize(matmul_weight(node))
            base = weight_v.name or node.name
            wq_v = new_initializer(b, base + "_quantized", wq)
            del wq
            ws = new_initializer(b, base + "_scale", scale)
            wz = new_initializer(b, base + "_zero_point", np.zeros(scale.shape, np.int8))
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            x = node.inputs[0]
            out = node.outputs[0]
            new: list[ir.Node] = []
            if use_contrib:
                inputs = [x, wq_v, ws, wz] + ([bias] if bias is not None else [])
                n = b.node("DynamicQuantizeMatMul", inputs, node.name + "_dynamic")
                n.domain = "com.microsoft"
                new.append(n)
            else:
                dql = shared_dql.get(id(x))
                if dql is None:
                    dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3,
                                  name=b.name(node.name + "_DynamicQuantizeLinear"))
                    for o, suffix in zip(dql.outputs, ("_quantized", "_scale", "_zero_point")):
                        o.name = b.name(x.name + suffix)
                        b.taken.add(o.name)
                    shared_dql[id(x)] = dql
                    p = x.producer()
                    if p is not None and p.graph is graph:
                        graph.insert_after(p, dql)
                    else:
                        graph.insert_before(next(iter(graph)), dql)
                mmi = b.node("MatMulInteger", [dql.outputs[0], wq_v, dql.outputs[2], wz], node.name + "_MatMulInteger")
                cast = b.node("Cast", [mmi.outputs[0]], node.name + "_Cast", {"to": ir.DataType.FLOAT})
                scale = b.node("Mul", [dql.outputs[1], ws], node.name + "_scale")
                mul = b.node("Mul", [cast.outputs[0], scale.outputs[0]], node.name + "_Mul")
                new += [mmi, cast, scale, mul]
                if bias is not None:
                    new.append(b.node("Add", [mul.outputs[0], bias], node.name + "_bias"))
            last = new[-1].outputs[0]
            last.type, last.shape = out.type, out.shape
            graph.insert_after(node, new)
            replace_all_uses(out, last)  # keeps a graph output's name
            graph.remove(node, safe=True)
            drop_if_unused(graph, weight_v)
            stats.count(f"dynamic_{node.op_type}")
        drop_unused_initializers(graph)
        stats.details["contrib_op"] = use_contrib
        return True

    def _lstm_candidates(self, graph: ir.Graph, stats: PassStats) -> list[ir.Node]:
        """LSTMs to rewrite as onnxruntime's DynamicQuantizeLSTM (see :mod:`.recurrent`)."""
        todo = []
        for node in graph:
            if node.op_type not in RECURRENT or node.domain not in ("", "ai.onnx"):
                continue
            if node.name in self.exclude or node.op_type in self.exclude:
                stats.skip(node, "excluded by option 'exclude'")
            elif self.context.target == "onnx":
                stats.skip(node, "LSTM stays float on target onnx: its int8 form, DynamicQuantizeLSTM, is an "
                                 "onnxruntime contrib op")
            elif why := not_quantizable(node):
                stats.skip(node, why)
            else:
                todo.append(node)
        return todo

    def _quantize(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Wq int8 [K, N], s_w)`` computed a column chunk at a time (bounded float64 temporaries)."""
        k, n = w.shape
        wq = np.empty((k, n), np.int8)
        chunks = column_chunks(k, n)
        if self.per_channel:
            scales = []
            for sl in chunks:
                q, qp = quantize_weight(w[:, sl], 1)
                wq[:, sl] = q
                scales.append(qp.scale)
            return wq, np.concatenate(scales).astype(np.float32)
        absmax = max((float(np.max(np.abs(w[:, sl]))) for sl in chunks), default=0.0)
        qp = weight_qparams(np.array([absmax], np.float32), None)
        for sl in chunks:
            wq[:, sl] = quantize(w[:, sl], qp, (-WEIGHT_QMAX, WEIGHT_QMAX))
        return wq, qp.scale

