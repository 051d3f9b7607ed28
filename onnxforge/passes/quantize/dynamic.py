"""``quantize-dynamic``: int8 weights, activations quantized at run time (MatMul/Gemm only).

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
needed. Convolutions are left alone on purpose: dynamic int8 Conv re-quantizes every activation at
run time without a fused kernel and made CNNs 4-8x slower on CPU; use ``quantize-int8`` for them.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value, replace_all_uses
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.quantize.qdq import _Builder, _attr, upgrade_opset
from onnxforge.passes.quantize.qmath import quantize_weight
from onnxforge.passes.registry import register_pass


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Remove the float weights the quantized nodes replaced (nobody reads them any more)."""
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del graph.initializers[name]


def matmul_candidates(
    graph: ir.Graph, exclude, min_weight_size: int, stats: PassStats
) -> list[tuple[ir.Node, np.ndarray]]:
    """MatMul/Gemm nodes with a constant 2-D weight of at least ``min_weight_size`` elements, not
    excluded by name or op type, with their weights; every other MatMul/Gemm is reported as skipped."""
    todo = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        if node.name in exclude or node.op_type in exclude:
            stats.skip(node, "excluded by option 'exclude'")
            continue
        w, why = matmul_weight(node)
        if w is None:
            stats.skip(node, why)
            continue
        if w.size < min_weight_size:
            stats.skip(node, f"weight has {w.size} < min_weight_size={min_weight_size} elements")
            continue
        todo.append((node, w))
    return todo


def matmul_weight(node: ir.Node) -> tuple[np.ndarray | None, str]:
    """The ``[K, N]`` float weight of a MatMul/Gemm, or None and why not."""
    if node.domain not in ("", "ai.onnx"):
        return None, "not a standard op"
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None, "MatMul of two activations (attention) has no constant weight"
    if w.dtype != np.float32:
        return None, f"weight dtype {w.dtype} is not float32"
    if w.ndim != 2:
        return None, f"weight rank {w.ndim} (only 2-D [K, N] weights)"
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None, "Gemm with transA/alpha/beta"
        if _attr(node, "transB", 0):
            w = np.ascontiguousarray(w.T)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const_value(node.inputs[2])
            if b is None or b.ndim != 1 or b.shape[0] != w.shape[1]:
                return None, "Gemm bias is not a constant 1-D [N] vector"
    return w, ""


@register_pass("quantize-dynamic")
class QuantizeDynamicPass(Pass):
    """Dynamic int8 quantization of MatMul/Gemm: int8 per-column weights, uint8 activations at run time.

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
        contrib: Literal["auto", "yes", "no"] = "no",
    ):
        super().__init__()
        self.per_channel = per_channel
        self.min_weight_size = min_weight_size
        self.exclude = list(exclude or [])
        self.contrib = contrib

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        # auto = no: onnxruntime fuses the standard form better (see the module docstring)
        use_contrib = self.contrib == "yes" and self.context.target != "onnx"
        for node in graph:
            if node.op_type in ("Conv", "ConvTranspose"):
                stats.skip(node, "dynamic quantization skips convolutions (it makes CNNs slower); use quantize-int8")
        todo = matmul_candidates(graph, self.exclude, self.min_weight_size, stats)
        if not todo:
            return False
        if (model.opset_imports.get("", 0) or 0) < 11:
            upgrade_opset(model, 13, stats)
        if use_contrib:
            model.opset_imports.setdefault("com.microsoft", 1)
        b = _Builder(graph)
        shared_dql: dict[int, ir.Node] = {}
        for node, w in todo:
            wq, qp = quantize_weight(w, 1 if self.per_channel else None)
            base = node.inputs[1].name or node.name
            wq_v = b.init(base + "_quantized", wq)
            ws = b.init(base + "_scale", qp.scale)
            wz = b.init(base + "_zero_point", qp.zero_point)
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
            stats.count(f"dynamic_{node.op_type}")
        drop_unused_initializers(graph)
        stats.details["contrib_op"] = use_contrib
        return True

