"""``quantize-weights-int4``: block-wise 4-bit MatMul weights run by ``com.microsoft.MatMulNBits``.

For ``Y = X @ W`` with a constant ``W`` of shape ``[K, N]`` (Gemm: ``transB`` handled), each output
column ``n`` is cut along ``K`` into blocks of ``block_size`` (K is zero-padded to a multiple) and
every block ``B`` gets its own scale (and zero point):

* symmetric: ``s = max|B| / 7``, ``z = 8``, ``q = clip(round_half_even(w / s) + 8, 0, 15)``;
* asymmetric: ``s = (max(B, 0) - min(B, 0)) / 15``, ``z = clip(round(-min(B, 0) / s), 0, 15)``,
  ``q = clip(round_half_even(w / s) + z, 0, 15)``.

``W'[k, n] = (q - z) * s``. Two 4-bit values per byte (low nibble first), as MatMulNBits reads
them: ``B`` is ``uint8[N, K / block_size, block_size / 2]``, scales ``float[N * K / block_size]``,
zero points (asymmetric only) packed likewise. Activations stay float (weight-only), so no
calibration is needed.

Lossy: per weight ``|w - w'| <= s / 2`` (symmetric: ``<= max|B| / 14``); the model-level bound
is ``tolerance`` (10% of the output magnitude; cosine >= 0.98 on a BERT-style encoder). Needs
onnxruntime (the op is ``com.microsoft``), so on target ``onnx`` the pass refuses.

Streaming: one weight at a time is read (memory-mapped when external) and quantized in column
chunks of bounded size; the packed result goes to :func:`onnxforge.ir.io.spill` and the float
weight is dropped and unmapped as soon as its MatMul is replaced (issue 14).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxforge.errors import PassOptionError
from onnxforge.passes.base import Pass, PassStats
from onnxforge.ir.graph import replace_all_uses
from onnxforge.passes.quantize.dynamic import (
    column_chunks,
    drop_if_unused,
    drop_unused_initializers,
    matmul_candidates,
    matmul_weight,
    new_initializer,
)
from onnxforge.passes.quantize.rewrite import _Builder
from onnxforge.passes.cleanup import lift_constant_tensors
from onnxforge.passes.registry import register_pass


def quantize_blocks(w: np.ndarray, block_size: int, symmetric: bool):
    """``[K, N]`` float -> (q uint8 [N, n_blocks, block_size], scales [N, n_blocks], zps [N, n_blocks]).

    Columns are independent, so they are done in chunks: temporaries stay ~64 MB for any ``N``."""
    k, n = w.shape
    n_blocks = (k + block_size - 1) // block_size
    q = np.empty((n, n_blocks, block_size), np.uint8)
    scale = np.empty((n, n_blocks), np.float32)
    zp = np.empty((n, n_blocks), np.uint8)
    for sl in column_chunks(n_blocks * block_size, n):
        q[sl], scale[sl], zp[sl] = _quantize_columns(w[:, sl], block_size, symmetric)
    return q, scale, zp


def _quantize_columns(w: np.ndarray, block_size: int, symmetric: bool):
    k, n = w.shape
    n_blocks = (k + block_size - 1) // block_size
    padded = np.zeros((n_blocks * block_size, n), np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, n_blocks, block_size).astype(np.float64)
    del padded
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    if symmetric:
        absmax = np.maximum(hi, -lo)
        scale = np.where(absmax > 0, absmax / 7.0, 1.0)
        zp = np.full(scale.shape, 8, np.int64)
    else:
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
        zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.int64)
    # clip(round_half_even(w / s) + z, 0, 15), in place: one float64 buffer per chunk
    blocks /= scale[..., None]
    np.rint(blocks, out=blocks)
    blocks += zp[..., None]
    np.clip(blocks, 0, 15, out=blocks)
    return blocks.astype(np.uint8), scale.astype(np.float32), zp.astype(np.uint8)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Pack the last axis two 4-bit values per byte, low nibble first (odd length: pad with 0)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int) -> np.ndarray:
    n = q.shape[0]
    w = (q.astype(np.float32) - zp[..., None]) * scale[..., None]
    return w.reshape(n, -1)[:, :k].T


@register_pass("quantize-weights-int4")
class QuantizeWeightsInt4Pass(Pass):
    """Weight-only 4-bit block quantization of MatMul/Gemm weights into ``com.microsoft.MatMulNBits``.

    See the module docstring for the math and packing. Lossy (``tolerance``: 10% of the output's
    magnitude). Options: ``block_size`` (power of two >= 16), ``symmetric``, ``min_weight_size``.
    """

    lossless = False
    tolerance = 0.1

    def __init__(self, block_size: int = 32, symmetric: bool = True, min_weight_size: int = 0,
                 exclude: list[str] | None = None, accuracy_level: int = 0):
        super().__init__()
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.block_size = block_size
        self.symmetric = symmetric
        self.min_weight_size = min_weight_size
        self.exclude = list(exclude or [])
        self.accuracy_level = accuracy_level

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        if self.context.target == "onnx":
            raise PassOptionError(
                "quantize-weights-int4 emits com.microsoft.MatMulNBits (onnxruntime only); "
                "target 'onnx' allows standard ops only"
            )
        lifted = lift_constant_tensors(model)
        graph = model.graph
        todo = matmul_candidates(graph, self.exclude, self.min_weight_size, stats)
        if not todo:
            return bool(lifted)
        model.opset_imports.setdefault("com.microsoft", 1)
        b = _Builder(graph)
        for node in todo:
            weight_v = node.inputs[1]
            w = matmul_weight(node)
            k, n = w.shape
            q, scale, zp = quantize_blocks(w, self.block_size, self.symmetric)
            del w  # the memory map's view: drop_if_unused below unmaps the file
            base = weight_v.name or node.name
            inputs = [node.inputs[0], new_initializer(b, base + "_q4", pack_nibbles(q)),
                      new_initializer(b, base + "_scales", scale.reshape(-1))]
            if not self.symmetric:
                inputs.append(new_initializer(b, base + "_zero_points", pack_nibbles(zp).reshape(-1)))
            del q
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            if bias is not None:
                inputs += [None] * (5 - len(inputs)) + [bias]
            attrs = {"K": k, "N": n, "bits": 4, "block_size": self.block_size}
            if self.accuracy_level:
                attrs["accuracy_level"] = self.accuracy_level
            new = b.node("MatMulNBits", inputs, node.name + "_nbits", attrs)
            new.domain = "com.microsoft"
            out = node.outputs[0]
            last = new.outputs[0]
            last.type, last.shape = out.type, out.shape
            graph.insert_after(node, new)
            replace_all_uses(out, last)  # keeps a graph output's name
            graph.remove(node, safe=True)
            drop_if_unused(graph, weight_v)
            stats.count(f"int4_{node.op_type}")
        drop_unused_initializers(graph)
        return True
