"""Would per-channel quantization of depthwise-conv inputs recover int8 accuracy? (issue 11, experiment)

onnxruntime's QLinearConv takes one input scale. For a **depthwise** conv (each output channel reads
one input channel) a per-channel input scale ``s_c`` is still exact: it folds into the per-channel weight
scale (``w'_c = w_c * s_c / S`` with a common ``S``), so such a tensor could be quantized per channel
at no kernel cost (the zero point must stay common). This script measures what that would buy before
building it: it quantizes a suite model as the ``int8-nearest`` row of ``bench_real.py`` does
(optionally with ``--exclude`` layers float), then re-quantizes the input of every depthwise conv (or
every conv, ``--all``: an upper bound, not exact for ordinary convs) per channel from per-channel
min/max on the calibration data, clipped to the tensor's per-tensor range (a folded Relu/Clip lives
there), with the tensor's zero point, and scores both models **simulated** (ORT_DISABLE_ALL). The
per-channel ranges are read on the int8 model (simulated), whose tensor names the Q nodes use.

    .venv/bin/python bench/diag_dw_per_channel.py --model layout --eval 100
    .venv/bin/python bench/diag_dw_per_channel.py --model layout --eval 100 --exclude p2o.Conv.0,p2o.Conv.5

Bench-only experiment, no unit tests; figures in BENCHMARKS.md (Trained-model suite, run 7).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bench_real as br  # noqa: E402

from onnxforge.api import optimize  # noqa: E402
from onnxforge.ir.graph import const_value  # noqa: E402
from onnxforge.ir.io import model_to_bytes  # noqa: E402
from onnxforge.passes import PassContext, create_pass  # noqa: E402
from onnxforge.runtime.activations import collect_stats  # noqa: E402
from onnxforge.runtime.session import make_session  # noqa: E402
from onnxforge.testing.real import load_case  # noqa: E402


class _ChannelRange:
    """Per-channel (axis 1) running min and max."""

    def __init__(self) -> None:
        self.lo = self.hi = None

    def update(self, name: str, x: np.ndarray) -> None:
        axes = tuple(i for i in range(np.ndim(x)) if i != 1)
        lo, hi = np.min(x, axis=axes), np.max(x, axis=axes)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)


def _init(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                 const_value=ir.tensor(array))
    graph.register_initializer(v)
    return v


def per_channel_inputs(model: ir.Model, calib, every_conv: bool) -> int:
    """Give the chosen convs' inputs their own per-channel Q/DQ (in place); returns how many. The
    per-channel ranges are read on the int8 model itself (simulated): its tensor names are the ones
    the Q nodes read (the quantizer expands HardSwish and folds activations, so the float model's
    names do not all exist there)."""
    graph = model.graph
    targets = []
    for n in graph:
        dq = n.inputs[0].producer() if n.op_type == "Conv" else None
        if dq is None or dq.op_type != "DequantizeLinear" or const_value(dq.inputs[1]).size != 1:
            continue
        g = n.attributes.get("group")
        if not every_conv and (g is None or int(g.value) == 1):
            continue
        q = dq.inputs[0].producer()
        if q is not None and q.op_type == "QuantizeLinear":
            targets.append((n, dq, q))
    names = sorted({q.inputs[0].name for _, _, q in targets})
    ranges = {k: (r.lo, r.hi) for k, r in collect_stats(model, calib, names, _ChannelRange).items()}
    done = 0
    for n, dq, q in targets:
        t = q.inputs[0]
        if t.name not in ranges:
            continue
        lo, hi = ranges[t.name]
        zp_arr = const_value(q.inputs[2])
        zp, dt = int(zp_arr.reshape(-1)[0]), zp_arr.dtype
        qmin, qmax = (0, 255) if dt == np.uint8 else (-128, 127)
        s_t = float(const_value(q.inputs[1]).reshape(-1)[0])
        lo = np.clip(lo, (qmin - zp) * s_t, 0.0)  # the per-tensor range holds folded Relu/Clip
        hi = np.clip(hi, 0.0, (qmax - zp) * s_t)
        s = np.maximum(np.maximum(hi / max(qmax - zp, 1), -lo / max(zp - qmin, 1)), 1e-8).astype(np.float32)
        factor = float(const_value(dq.inputs[1]).reshape(-1)[0]) / s_t  # a folded rescale (x / 6) is in the DQ scale
        zv = _init(graph, f"{n.name}_pc_zero_point", np.full(s.size, zp, dt))
        qn = ir.node("QuantizeLinear", [t, _init(graph, f"{n.name}_pc_scale", s), zv], attributes={"axis": 1},
                     name=f"{n.name}_pc_QuantizeLinear")
        dqn = ir.node("DequantizeLinear", [qn.outputs[0], _init(graph, f"{n.name}_pc_dq_scale", s * np.float32(factor)),
                                           zv], attributes={"axis": 1}, name=f"{n.name}_pc_DequantizeLinear")
        qn.outputs[0].name, dqn.outputs[0].name = f"{n.name}_pc_q", f"{n.name}_pc_dq"
        graph.insert_after(dq, [qn, dqn])
        n.replace_input_with(0, dqn.outputs[0])
        done += 1
    graph.sort()
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="layout")
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--exclude", default="", help="comma-separated layers kept float")
    ap.add_argument("--all", action="store_true", help="every conv's input, not only depthwise (upper bound)")
    args = ap.parse_args()
    case = load_case(args.model)
    calib, held = case.calibration_feeds(32), case.eval_feeds(args.eval)
    original = case.model_path.read_bytes()
    o2 = optimize(onnx.load_from_string(original), "O2").model
    options = {"calibration": "sqnr", "bias_correction": True, "exclude": [x for x in args.exclude.split(",") if x]}
    model = create_pass("quantize-int8", options, PassContext(calibration_data=calib))(
        ir.serde.deserialize_model(ir.serde.serialize_model(o2))).model
    ref = br._outputs(make_session(original, threads=1, optimize="disable"), held)

    def score(m: ir.Model) -> float:
        return case.metric(ref, br._outputs(make_session(model_to_bytes(m), threads=1, optimize="disable"), held))

    print(f"{args.model}: int8 (simulated) {score(model):.4f}", flush=True)
    n = per_channel_inputs(model, calib, args.all)
    kind = "conv" if args.all else "depthwise conv"
    print(f"{args.model}: + per-channel inputs of {n} {kind}s (simulated) {score(model):.4f}", flush=True)


if __name__ == "__main__":
    main()
