"""LSTM in int8 on onnxruntime's CPU provider: ``LSTM`` -> ``com.microsoft.DynamicQuantizeLSTM``.

onnxruntime has no QDQ form of a recurrent op, but its CPU provider has an LSTM kernel with int8
weights: ``DynamicQuantizeLSTM`` quantizes the input sequence ``X`` and every hidden state ``H_t``
to uint8 at run time (per tensor, from its own min/max: no calibration) and multiplies them with
int8 ``W`` and ``R`` in integer GEMMs (u8 x s8, int32 accumulation). The ddddocr text recognizer's
bidirectional LSTM takes 24 % of its fp32 time, and 43 % once its convs and head are int8.

Math, per direction ``d`` and gate row ``r`` (``W``: ``[dirs, 4H, I]``, ``R``: ``[dirs, 4H, H]``)::

    s[d, r] = max_k |W[d, r, k]| / 127        (symmetric, zero point 0)
    Wq[d, r, k] = clip(round_half_even(W[d, r, k] / s[d, r]), -127, 127)

stored transposed, ``[dirs, I, 4H]`` (the kernel's layout; likewise ``R``), with the scales as
``[dirs, 4H]``. Lossy: per weight at most ``s / 2``; per activation at most half of its dynamic
scale. Gates, the bias and the cell state stay float. ``layout=1`` (batch-first) has no
``DynamicQuantizeLSTM`` form: such an LSTM stays float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value
from onnxforge.passes.quantize.qmath import quantize_weight

MS_DOMAIN = "com.microsoft"
RECURRENT = {"LSTM"}


def not_quantizable(node: ir.Node) -> str | None:
    """Why ``node`` (an LSTM) cannot become a DynamicQuantizeLSTM, or None when it can."""
    attrs = node.attributes
    if attrs.get("layout") is not None and attrs["layout"].value != 0:
        return "LSTM with layout=1 (batch first) has no int8 kernel (DynamicQuantizeLSTM is sequence first)"
    for j, what in ((1, "W"), (2, "R")):
        v = node.inputs[j] if len(node.inputs) > j else None
        w = const_value(v)
        if w is None or w.dtype != np.float32 or w.ndim != 3:
            return f"LSTM {what} is not a 3-D float32 constant"
    return None


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Wq [dirs, K, 4H] int8, scale [dirs, 4H] float32)`` of ``w`` ``[dirs, 4H, K]`` (module docstring)."""
    dirs, rows, k = w.shape
    q, qp = quantize_weight(w.reshape(dirs * rows, k), 0)  # one scale per row (an all-zero row: 1)
    return (np.ascontiguousarray(q.reshape(dirs, rows, k).transpose(0, 2, 1)),
            np.asarray(qp.scale, np.float32).reshape(dirs, rows))


def to_dynamic_lstm(graph: ir.Graph, node: ir.Node, builder) -> ir.Node:
    """Replace ``node`` (an LSTM that :func:`not_quantizable` accepts) with a DynamicQuantizeLSTM."""
    name = node.name or "LSTM"
    extra: list[ir.Value] = []
    weights: list[ir.Value] = []
    for j, what in ((1, "W"), (2, "R")):
        q, scale = quantize_rows(np.asarray(const_value(node.inputs[j]), np.float32))
        weights.append(builder.init(f"{name}_{what}_quantized", q))
        extra += [builder.init(f"{name}_{what}_scale", scale),
                  builder.init(f"{name}_{what}_zero_point", np.zeros(scale.shape, np.int8))]
    optional = [node.inputs[j] if len(node.inputs) > j else None for j in range(3, 8)]
    attrs = {k: a for k, a in node.attributes.items() if k != "layout"}
    new = ir.Node(MS_DOMAIN, "DynamicQuantizeLSTM", [node.inputs[0], *weights, *optional, *extra],
                  attributes=list(attrs.values()), num_outputs=len(node.outputs), name=builder.name(name + "_int8"))
    graph.insert_before(node, new)
    float_weights = [node.inputs[1], node.inputs[2]]
    for old, out in zip(node.outputs, new.outputs):
        out_name = old.name
        old.name = builder.name((out_name or name) + "_float")
        out.name, out.shape, out.type = out_name, old.shape, old.type
        old.replace_all_uses_with(out)
        for k, o in enumerate(graph.outputs):
            if o is old:
                graph.outputs[k] = out
    graph.remove(node, safe=True)
    for v in float_weights:  # the float W and R, unless something else reads them
        if v is not None and v.is_initializer() and not v.uses() and not v.is_graph_output():
            graph.initializers.pop(v.name, None)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    return new
