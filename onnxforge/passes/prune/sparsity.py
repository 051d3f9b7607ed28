"""Unstructured and 2:4 semi-structured weight sparsity: ``prune-magnitude`` and ``sparsity-2-4``.

Both set weights of Conv / ConvTranspose / Gemm / MatMul to zero in place; shapes do not change.

* ``prune-magnitude``: zero the fraction ``ratio`` of smallest ``|w|``, either over all eligible
  weights at once (``scope=global``: one threshold ``t`` = the ``ratio``-quantile of every ``|w|``)
  or per layer (``scope=layer``: each layer's own quantile).
* ``sparsity-2-4``: in every group of 4 consecutive weights along the input (reduction) axis of each
  output unit, keep the 2 largest ``|w|`` and zero the other 2 (the pattern of NVIDIA's sparse tensor
  cores, used by TensorRT's sparse kernels). Layers whose reduction length is not a multiple of 4
  are skipped and reported.

Honest note: onnxruntime's CPU kernels are dense, so neither pass makes the model run faster there;
the gain is size after compression (zeros compress: ``stats.details["gzip_bytes_before/after"]``),
and speed only on runtimes with sparse kernels (TensorRT with sparsity enabled on Ampere+ GPUs for
2:4). Lossy: the output error is bounded by ``sum |dropped w * x|``, nothing tighter; no tolerance.
"""

from __future__ import annotations

import gzip
import math
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.prune.shrink import set_constant
from onnxforge.passes.registry import register_pass

WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def _weights(model: ir.Model, stats: PassStats, min_size: int) -> list[tuple[ir.Node, ir.Value, np.ndarray]]:
    out, seen = [], set()
    for node in model.graph:
        if node.op_type not in WEIGHTED or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        value = node.inputs[1]
        arr = const_value(value)
        if arr is None or arr.dtype not in (np.float32, np.float16, np.float64):
            continue
        if value in seen:
            continue
        if arr.size < min_size:
            stats.skip(node, f"weight has {arr.size} < min_size={min_size} elements")
            continue
        seen.add(value)
        out.append((node, value, np.array(arr, copy=True)))
    return out


def _gzip_size(arrays: list[np.ndarray]) -> int:
    return sum(len(gzip.compress(a.tobytes(), compresslevel=6)) for a in arrays)


def _record(stats: PassStats, before: list[np.ndarray], after: list[np.ndarray]) -> None:
    total = sum(a.size for a in after)
    zeros = sum(int((a == 0).sum()) for a in after)
    stats.details["zero_fraction"] = zeros / total if total else 0.0
    stats.details["weights"] = total
    stats.details["gzip_bytes_before"] = _gzip_size(before)
    stats.details["gzip_bytes_after"] = _gzip_size(after)
    stats.details["raw_bytes"] = sum(a.nbytes for a in after)
    stats.note("onnxruntime CPU runs dense kernels: zeros shrink the compressed file, not the latency")


@register_pass("prune-magnitude")
class PruneMagnitudePass(Pass):
    """Zero the ``ratio`` smallest-magnitude weights (global or per-layer threshold). Lossy."""

    lossless = False
    tolerance = math.inf

    def __init__(self, ratio: float = 0.5, scope: Literal["global", "layer"] = "global", min_size: int = 64):
        super().__init__()
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.ratio = ratio
        self.scope = scope
        self.min_size = min_size

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        weights = _weights(model, stats, self.min_size)
        if not weights or self.ratio == 0:
            return False
        before = [w for _, _, w in weights]
        if self.scope == "global":
            everything = np.concatenate([np.abs(w).ravel() for w in before])
            k = int(math.floor(self.ratio * everything.size))
            thresholds = [np.partition(everything, k - 1)[k - 1] if k > 0 else -1.0] * len(before)
        else:
            thresholds = []
            for w in before:
                k = int(math.floor(self.ratio * w.size))
                thresholds.append(np.partition(np.abs(w).ravel(), k - 1)[k - 1] if k > 0 else -1.0)
        after = []
        for (node, value, w), t in zip(weights, thresholds):
            new = np.where(np.abs(w) <= t, 0, w).astype(w.dtype)
            set_constant(value, new)
            after.append(new)
            stats.count("layers")
        _record(stats, before, after)
        return True


@register_pass("sparsity-2-4")
class Sparsity24Pass(Pass):
    """2:4 semi-structured sparsity: keep the 2 largest of every 4 input weights. Lossy."""

    lossless = False
    tolerance = math.inf

    def __init__(self, min_size: int = 64):
        super().__init__()
        self.min_size = min_size

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        weights = _weights(model, stats, self.min_size)
        before, after = [], []
        for node, value, w in weights:
            # Bring the reduction axis last: Conv [O, C, kh, kw] -> groups along C (for each kernel
            # position, as TensorRT lays it out: [O, kh, kw, C]); Gemm/MatMul [K, N] -> along K.
            if node.op_type == "Conv":
                moved = np.moveaxis(w, 1, -1)
            elif node.op_type == "ConvTranspose":
                moved = np.moveaxis(w, 0, -1)
            elif node.op_type == "Gemm" and int(node.attributes.get("transB", ir.AttrInt64("transB", 0)).value):
                moved = w
            else:
                moved = np.moveaxis(w, 0, -1) if w.ndim == 2 else None
            if moved is None or moved.shape[-1] % 4:
                stats.skip(node, f"reduction length {None if moved is None else moved.shape[-1]} is not a multiple of 4")
                continue
            groups = moved.reshape(-1, 4)
            order = np.argsort(np.abs(groups), axis=1, kind="stable")
            mask = np.ones_like(groups, dtype=bool)
            np.put_along_axis(mask, order[:, :2], False, axis=1)
            sparse = np.where(mask, groups, 0).reshape(moved.shape)
            if node.op_type == "Conv":
                new = np.moveaxis(sparse, -1, 1)
            elif node.op_type == "ConvTranspose" or not (node.op_type == "Gemm" and moved is w):
                new = np.moveaxis(sparse, -1, 0)
            else:
                new = sparse
            new = np.ascontiguousarray(new.astype(w.dtype))
            set_constant(value, new)
            before.append(w)
            after.append(new)
            stats.count("layers")
        if not after:
            return False
        _record(stats, before, after)
        return True
