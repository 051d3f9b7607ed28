"""``quantize-weights-ternary`` and ``quantize-weights-binary``: {-1, 0, +1} / {-1, +1} weights. Lossy.

Per output channel ``o`` of a Conv / Gemm / MatMul weight ``W`` (Conv: axis 0; MatMul ``[K, N]`` and
Gemm ``transB=0``: axis 1; Gemm ``transB=1``: axis 0):

* ternary (TWN, Li & Liu 2016): ``Δ_o = 0.7 · mean|W_o|``, ``t = sign(W) · [|W| > Δ_o]``,
  ``α_o = mean(|W_o| over |W_o| > Δ_o)`` (0 when nothing exceeds ``Δ_o``);
* binary (XNOR-Net, Rastegari et al. 2016): ``t = sign(W)`` (``sign(0) = +1``), ``α_o = mean|W_o|``;

and ``W' = α_o · t``. Both ``α`` are the least-squares optimal scales for their codes. Activations stay
float: only the weights shrink.

Storage — **size, not speed**:

* MatMul / Gemm (targets ``cpu`` / ``cuda`` / ``tensorrt``): ``com.microsoft.MatMulNBits`` with
  ``bits=2`` (checked to run on onnxruntime 1.32's CPU provider): codes ``t + 2`` in {1, 2, 3} (binary:
  {1, 3}), four per byte, default zero point 2, every ``block_size`` block of a column scaled by the
  same ``α_o``. The kernel dequantizes blocks on the fly; on CPU it is not faster than float for small
  layers (BENCHMARKS.md).
* Conv, and MatMul / Gemm on target ``onnx``: a packed ``uint8`` initializer (ternary: 2 bits per
  weight, code ``t + 1``; binary: 1 bit, code ``(t + 1) / 2``) expanded by a small standard subgraph
  ``Unsqueeze -> BitShift(RIGHT) -> BitwiseAnd -> Cast -> Reshape -> Mul(a·α) -> Add(b·α)`` (opset >= 18
  for ``BitwiseAnd``). onnxruntime folds it to a float constant when the session is created, so the
  file is small and the run is exactly as fast as float.

The first and the last weighted layer are kept float by default (``keep_first_last``), as binary and
ternary networks usually do. No a-priori error bound (``tolerance = inf``); fidelity is reported by the
verifier, accuracy by the benchmark.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value, is_shared, node_attr, opset_version, replace_all_uses
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.quantize.dynamic import (
    drop_if_unused,
    drop_unused_initializers,
    matmul_weight,
    matmul_weight_check,
    new_initializer,
)
from onnxforge.passes.quantize.rewrite import _Builder
from onnxforge.passes.registry import register_pass

logger = logging.getLogger(__name__)

__all__ = ["QuantizeWeightsBinaryPass", "QuantizeWeightsTernaryPass", "binarize", "pack_codes", "ternarize",
           "unpack_codes"]

TWN_THRESHOLD = 0.7


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def ternarize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 in {-1, 0, 1} shaped like ``w``, alpha float32 ``[w.shape[axis]]``): TWN, see module doc."""
    a = np.abs(w.astype(np.float64))
    red = _reduce_axes(w.ndim, axis)
    delta = TWN_THRESHOLD * a.mean(axis=red, keepdims=True)
    keep = a > delta
    codes = (np.sign(w) * keep).astype(np.int8)
    count = keep.sum(axis=red)
    alpha = np.where(count > 0, (a * keep).sum(axis=red) / np.maximum(count, 1), 0.0)
    return codes, alpha.astype(np.float32)


def binarize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 in {-1, 1}, alpha float32 ``[w.shape[axis]]``): XNOR, ``alpha = mean|W_o|``."""
    codes = np.where(w >= 0, 1, -1).astype(np.int8)
    alpha = np.abs(w.astype(np.float64)).mean(axis=_reduce_axes(w.ndim, axis))
    return codes, alpha.astype(np.float32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (< 2**bits), flattened in C order, ``8 // bits`` per byte, first in the low bits."""
    per = 8 // bits
    flat = codes.reshape(-1).astype(np.uint8)
    padded = np.zeros(-(-flat.size // per) * per, np.uint8)
    padded[: flat.size] = flat
    groups = padded.reshape(-1, per)
    out = np.zeros(len(groups), np.uint8)
    for i in range(per):
        out |= (groups[:, i] << (bits * i)).astype(np.uint8)
    return out


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``n`` codes (uint8)."""
    per = 8 // bits
    shifts = (np.arange(per) * bits).astype(np.uint8)
    return ((packed[:, None] >> shifts[None, :]) & ((1 << bits) - 1)).reshape(-1)[:n]


class _LowBitPass(Pass):
    lossless = False
    tolerance = math.inf
    mode = ""  # "ternary" or "binary"

    def __init__(self, keep_first_last: bool = True, exclude: list[str] | None = None, min_weight_size: int = 0,
                 matmul_nbits: bool = True, block_size: int = 32):
        super().__init__()
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.keep_first_last = keep_first_last
        self.exclude = list(exclude or [])
        self.min_weight_size = min_weight_size
        self.matmul_nbits = matmul_nbits
        self.block_size = block_size

    # ------------------------------------------------------------------ analysis

    def _axis(self, node: ir.Node) -> int | None:
        if node.op_type == "Conv":
            return 0
        if node.op_type == "Gemm":
            return 0 if node_attr(node, "transB", 0) else 1
        return 1  # MatMul [K, N]

    def _check(self, node: ir.Node) -> str:
        if node.name in self.exclude or node.op_type in self.exclude:
            return "excluded by option 'exclude'"
        if node.op_type in ("MatMul", "Gemm"):
            why = matmul_weight_check(node)
            if why:
                return why
        elif node.domain not in ("", "ai.onnx"):
            return "not a standard op"
        w = node.inputs[1] if len(node.inputs) > 1 else None
        arr = const_value(w)
        if arr is None:
            return "weight is not a constant"
        if arr.dtype != np.float32:
            return f"weight dtype {arr.dtype} is not float32"
        if is_shared(w):
            return "weight is shared with another reader"
        if arr.size < self.min_weight_size:
            return f"weight has {arr.size} < min_weight_size={self.min_weight_size} elements"
        return ""

    def _codes(self, w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
        return ternarize(w, axis) if self.mode == "ternary" else binarize(w, axis)

    # ------------------------------------------------------------------ rewrite

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        graph = model.graph
        weighted = [n for n in graph if n.op_type in ("Conv", "MatMul", "Gemm")
                    and len(n.inputs) > 1 and const_value(n.inputs[1]) is not None]
        ends = {id(weighted[0]), id(weighted[-1])} if weighted and self.keep_first_last else set()
        todo = []
        for node in graph:
            if node.op_type not in ("Conv", "MatMul", "Gemm"):
                continue
            if id(node) in ends:
                stats.skip(node, "first/last weighted layer kept float (keep_first_last=True)")
                continue
            why = self._check(node)
            if why:
                stats.skip(node, why)
                continue
            todo.append(node)
        if not todo:
            return False
        b = _Builder(graph)
        before = after = 0
        use_nbits = self.matmul_nbits and self.context.target != "onnx"
        opset = opset_version(model) or 0
        for node in todo:
            w = const_value(node.inputs[1])
            if node.op_type in ("MatMul", "Gemm") and use_nbits:
                after += self._to_matmul_nbits(model, graph, b, node)
                stats.count(f"{self.mode}_MatMulNBits")
            elif opset >= 18:
                after += self._to_packed_constant(graph, b, node, w)
                stats.count(f"{self.mode}_{node.op_type}_packed")
            else:
                stats.skip(node, f"the unpack subgraph needs BitwiseAnd (opset >= 18); the model has opset {opset}")
                continue
            before += w.nbytes
        if after:
            drop_unused_initializers(graph)  # the float weights the packed ones replaced
        stats.details["weight_bytes_before"] = before
        stats.details["weight_bytes_after"] = after
        logger.info("%s: %d layers, weights %d -> %d bytes", self.mode, len(todo), before, after)
        return after > 0

    def _to_matmul_nbits(self, model: ir.Model, graph: ir.Graph, b: _Builder, node: ir.Node) -> int:
        weight_v = node.inputs[1]
        w = matmul_weight(node)  # [K, N]
        k, n = w.shape
        codes, alpha = self._codes(w, axis=1)
        bs = self.block_size
        n_blocks = -(-k // bs)
        q = np.full((n_blocks * bs, n), 2, np.uint8)  # padding rows decode to 0
        q[:k] = (codes + 2).astype(np.uint8)
        q = q.T.reshape(n, n_blocks, bs)
        packed = pack_codes(q, 2).reshape(n, n_blocks, bs // 4)  # C order: block by block, as MatMulNBits reads
        scales = np.repeat(alpha[:, None], n_blocks, axis=1).reshape(-1).astype(np.float32)
        base = weight_v.name or node.name
        inputs = [node.inputs[0], new_initializer(b, base + f"_{self.mode}2", packed),
                  new_initializer(b, base + "_scales", scales)]
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            inputs += [None] * (5 - len(inputs)) + [bias]
        model.opset_imports.setdefault("com.microsoft", 1)
        new = b.node("MatMulNBits", inputs, node.name + "_nbits", {"K": k, "N": n, "bits": 2, "block_size": bs})
        new.domain = "com.microsoft"
        out, last = node.outputs[0], new.outputs[0]
        last.type, last.shape = out.type, out.shape
        graph.insert_after(node, new)
        replace_all_uses(out, last)  # keeps a graph output's name
        graph.remove(node, safe=True)
        drop_if_unused(graph, weight_v)
        return packed.nbytes + scales.nbytes

    def _to_packed_constant(self, graph: ir.Graph, b: _Builder, node: ir.Node, w: np.ndarray) -> int:
        weight_v = node.inputs[1]
        axis = self._axis(node)
        codes, alpha = self._codes(w, axis)
        if self.mode == "ternary":
            bits, unsigned, mul, add = 2, codes + 1, 1.0, -1.0   # t = code - 1
        else:
            bits, unsigned, mul, add = 1, (codes + 1) // 2, 2.0, -1.0  # t = 2 code - 1
        packed = pack_codes(unsigned.astype(np.uint8), bits)
        per = 8 // bits
        bshape = [1] * w.ndim
        bshape[axis] = w.shape[axis]
        base = weight_v.name or node.name
        c = {  # small constants of the unpack subgraph
            "packed": new_initializer(b, base + f"_{self.mode}{bits}", packed),
            "axes": b.init(base + "_axes", np.array([1], np.int64)),
            "shifts": b.init(base + "_shifts", (np.arange(per) * bits).astype(np.uint8)[None, :]),
            "mask": b.init(base + "_mask", np.array((1 << bits) - 1, np.uint8)),
            "flat": b.init(base + "_flat", np.array([-1], np.int64)),
            "shape": b.init(base + "_shape", np.array(w.shape, np.int64)),
            "scale": b.init(base + "_alpha_mul", (alpha * mul).reshape(bshape).astype(np.float32)),
            "offset": b.init(base + "_alpha_add", (alpha * add).reshape(bshape).astype(np.float32)),
        }
        nodes = []

        def op(kind, inputs, attrs=None):
            n = b.node(kind, inputs, f"{base}_{kind.lower()}", attrs)
            nodes.append(n)
            return n.outputs[0]

        x = op("Unsqueeze", [c["packed"], c["axes"]])
        x = op("BitShift", [x, c["shifts"]], {"direction": "RIGHT"})
        x = op("BitwiseAnd", [x, c["mask"]])
        x = op("Cast", [x], {"to": ir.DataType.FLOAT})
        x = op("Reshape", [x, c["flat"]])
        if packed.size * per != w.size:
            ends = b.init(base + "_n", np.array([w.size], np.int64))
            x = op("Slice", [x, b.init(base + "_zero", np.array([0], np.int64)), ends])
        x = op("Reshape", [x, c["shape"]])
        x = op("Mul", [x, c["scale"]])
        x = op("Add", [x, c["offset"]])
        x.type, x.shape = weight_v.type, weight_v.shape
        graph.insert_before(node, nodes)
        node.replace_input_with(1, x)
        drop_if_unused(graph, weight_v)
        return sum(v.const_value.numpy().nbytes for v in c.values())


@register_pass("quantize-weights-ternary")
class QuantizeWeightsTernaryPass(_LowBitPass):
    """Ternary {-1, 0, +1} weights with a per-output-channel scale (TWN). Lossy; see the module doc.

    Options: ``keep_first_last`` (keep the first and last weighted layer float), ``exclude`` (node
    names or op types), ``min_weight_size``, ``matmul_nbits`` (MatMulNBits bits=2 for MatMul/Gemm; else
    the packed-constant subgraph), ``block_size`` (MatMulNBits blocks; the scale is per channel).
    """

    mode = "ternary"


@register_pass("quantize-weights-binary")
class QuantizeWeightsBinaryPass(_LowBitPass):
    """Binary {-1, +1} weights with a per-output-channel scale (XNOR-Net). Lossy; see the module doc.

    Same options as ``quantize-weights-ternary``; the packed constant uses 1 bit per weight,
    MatMulNBits 2 bits (its smallest width).
    """

    mode = "binary"
