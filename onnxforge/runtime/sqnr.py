"""Per-layer quantization error: signal-to-quantization-noise ratio of matching activations.

For a layer (a node present, by name, in both the float and the quantized model) with float output
``x`` and quantized-model output ``y`` on the same inputs, summed over every sample:

    SQNR = 10 * log10( sum(x^2) / sum((x - y)^2) )   [dB]

Each 8-bit step of a well-used range is worth about 6 dB, so an int8 layer typically reads 20-40 dB;
below ~15 dB the layer is a candidate for staying float. ``inf`` means the outputs are identical.
The error measured at a layer includes everything upstream (it is what the next layer sees).

Both models run through :func:`onnxforge.runtime.activations.collect` (onnxruntime with
``ORT_DISABLE_ALL``, intermediate values exposed as outputs); nothing here modifies a model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from onnxforge.runtime._model import ModelLike, as_ir
from onnxforge.runtime.activations import collect


@dataclasses.dataclass
class LayerSQNR:
    """SQNR of one layer's output; ``sqnr_db`` is None when it could not be measured (``note`` says why)."""

    node: str
    op_type: str
    value: str
    sqnr_db: float | None
    samples: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["sqnr_db"] is not None and math.isinf(d["sqnr_db"]):
            d["sqnr_db"] = "inf"  # JSON has no infinity
        return d


def sqnr_db(signal: np.ndarray | Sequence[np.ndarray], candidate: np.ndarray | Sequence[np.ndarray]) -> float:
    """``10 log10(sum x^2 / sum (x - y)^2)`` over all given arrays (float64 sums)."""
    xs = [signal] if isinstance(signal, np.ndarray) else list(signal)
    ys = [candidate] if isinstance(candidate, np.ndarray) else list(candidate)
    power = noise = 0.0
    for x, y in zip(xs, ys, strict=True):
        x64 = np.asarray(x, np.float64)
        y64 = np.asarray(y, np.float64)
        if x64.shape != y64.shape:
            raise ValueError(f"shape {x64.shape} vs {y64.shape}")
        power += float(np.sum(x64 * x64))
        noise += float(np.sum((x64 - y64) ** 2))
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power / noise)


def layer_sqnr(
    reference: ModelLike,
    candidate: ModelLike,
    data: Iterable[Mapping[str, Any]],
    nodes: Sequence[str],
    *,
    max_samples: int | None = 16,
    providers: Sequence[str] = ("cpu",),
) -> list[LayerSQNR]:
    """SQNR of the first output of each node in ``nodes``, float ``reference`` vs quantized ``candidate``.

    Nodes are matched by name; a node missing from either model, or whose output cannot be exposed,
    gets ``sqnr_db=None`` and a note. The first ``max_samples`` feeds of ``data`` are taken once and
    run through both models.
    """
    ref_ir, cand_ir = as_ir(reference), as_ir(candidate)
    ref_nodes = {n.name: n for n in ref_ir.graph if n.name}
    cand_nodes = {n.name: n for n in cand_ir.graph if n.name}
    rows: list[LayerSQNR] = []
    pairs: list[tuple[LayerSQNR, str, str]] = []
    for name in nodes:
        r, c = ref_nodes.get(name), cand_nodes.get(name)
        op = (r or c).op_type if (r or c) is not None else "?"
        if r is None or c is None or not r.outputs or not c.outputs:
            where = "float" if r is None else "quantized"
            rows.append(LayerSQNR(name, op, "", None, 0, f"node not in the {where} model"))
            continue
        row = LayerSQNR(name, op, r.outputs[0].name or "", None, 0)
        rows.append(row)
        pairs.append((row, r.outputs[0].name or "", c.outputs[0].name or ""))
    if not pairs:
        return rows
    # Both models must see the same samples: take them once (only as many as will be used).
    feeds = list(itertools.islice(iter(data), max_samples)) if max_samples else list(data)
    ref_acts = collect(ref_ir, feeds, [p[1] for p in pairs], providers=providers, max_samples=max_samples)
    cand_acts = collect(cand_ir, feeds, [p[2] for p in pairs], providers=providers, max_samples=max_samples)
    for row, ref_name, cand_name in pairs:
        if ref_name not in ref_acts or cand_name not in cand_acts:
            row.note = ref_acts.skipped.get(ref_name) or cand_acts.skipped.get(cand_name) or "value not exposed"
            continue
        xs, ys = ref_acts[ref_name], cand_acts[cand_name]
        try:
            row.sqnr_db = sqnr_db(xs, ys)
        except ValueError as e:
            row.note = f"output shapes differ: {e}"
            continue
        row.samples = len(xs)
    return rows


__all__ = ["LayerSQNR", "layer_sqnr", "sqnr_db"]
