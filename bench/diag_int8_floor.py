"""Where a detector's int8 loss comes from, when no single layer carries it (issue 11).

For a model of the trained-model suite, quantized as the ``int8-nearest`` row of ``bench_real.py``
(``quantize-int8(calibration=sqnr)`` + bias correction, one QuantContext, as
``diag_int8_layers.Setup`` builds it), this prints:

* ``--sweep``: leave-one-float: F1 with every weighted node int8 except one, minus all-int8, on
  ``--select`` samples **disjoint** from the first ``--eval`` (so a node picked here can be judged
  there). The float node stays float in onnxruntime (see ``rewrite._keep_float``).
* ``--split``: all int8 and activations only (weights and biases float), both simulated
  (``ORT_DISABLE_ALL``), on the first ``--eval`` samples: how much of the loss the activations carry.
* ``--calibration M1,M2,...``: all int8 with each calibration method, on the first ``--eval`` samples.
* ``--trace NODE``: per-channel NSR ``sum(d^2) / sum((r - mean r)^2)`` of every Conv output against
  the float model, all-int8 vs all-int8 with ``NODE`` float, simulated, on 8 calibration samples:
  how a small change at one layer moves the error downstream.

    .venv/bin/python bench/diag_int8_floor.py --model det --sweep --split --calibration minmax,percentile,entropy,sqnr
    .venv/bin/python bench/diag_int8_floor.py --model det --trace Conv_44

Bench-only diagnosis, no unit tests; figures in BENCHMARKS.md (Trained-model suite, run 7).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import diag_int8_layers as diag  # noqa: E402


def _setup(model: str, n_eval: int, n_select: int, options: dict | None = None):
    return diag.Setup(model, 32, n_eval + n_select, 8, options=options)


def _f1(s, chosen, feeds, ref, optimize: str = "all", model=None) -> float:
    out = s.run(model if model is not None else s.qc.build(set(chosen)), feeds, optimize)
    return s.case.metric(ref, out)


def sweep(s, n_eval: int) -> None:
    sel, ref = s.held[n_eval:], s.ref_held[n_eval:]
    base = _f1(s, s.chosen, sel, ref)
    print(f"all int8 on {len(sel)} selection samples: F1 {base:.4f}", flush=True)
    gains = {}
    for i in s.weighted:
        gains[s.infos[i].name] = _f1(s, s.subset({i}), sel, ref) - base
    up = sorted((g, n) for n, g in gains.items() if g > 0)[::-1]
    down = sorted((g, n) for n, g in gains.items() if g < 0)
    print(f"leave-one-float: {len(up)} of {len(gains)} raise F1, {len(down)} lower it, "
          f"{len(gains) - len(up) - len(down)} unchanged")
    print("  best:", ", ".join(f"{n} {100 * g:+.2f} pt" for g, n in up[:5]))
    print("  worst:", ", ".join(f"{n} {100 * g:+.2f} pt" for g, n in down[:5]), flush=True)


def split(s, n_eval: int) -> None:
    from bench_real import activations_only

    feeds, ref = s.held[:n_eval], s.ref_held[:n_eval]
    print(f"all int8, simulated: F1 {_f1(s, s.chosen, feeds, ref, 'disable'):.4f}", flush=True)
    saved, s.qc.bias_delta = s.qc.bias_delta, {}
    acts = activations_only(s.qc, s.chosen)
    s.qc.bias_delta = saved
    print(f"activations only (float weights), simulated: F1 {_f1(s, None, feeds, ref, 'disable', acts):.4f}",
          flush=True)


def trace(s, node_name: str) -> None:
    import onnx
    import onnxruntime as ort

    from onnxforge.ir.io import model_to_bytes

    idx = {s.infos[i].name: i for i in s.weighted}
    convs = [n.outputs[0].name for n in s.qc.fresh().graph if n.op_type == "Conv"]

    def run(data: bytes):
        m = onnx.load_from_string(data)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in convs if t not in have)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [sess.run(convs, f) for f in s.proxy_feeds]

    def nsr(ref, out, k):
        r = np.concatenate([x[k].ravel() for x in ref])
        o = np.concatenate([x[k].ravel() for x in out])
        return float(np.sum((o - r) ** 2) / np.sum((r - r.mean()) ** 2))

    ref = run(s.qc.float_bytes)
    a = run(model_to_bytes(s.qc.build(set(s.chosen))))
    b = run(model_to_bytes(s.qc.build(set(s.subset({idx[node_name]})))))
    print(f"| conv output | NSR all int8 | NSR with {node_name} float |\n|---|---|---|")
    for k, t in enumerate(convs):
        print(f"| {t} | {nsr(ref, a, k):.5f} | {nsr(ref, b, k):.5f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="det")
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--select", type=int, default=128)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--calibration", default="")
    ap.add_argument("--trace", default="")
    args = ap.parse_args()
    t0 = time.perf_counter()
    s = _setup(args.model, args.eval, args.select if args.sweep else 0)
    if args.split:
        split(s, args.eval)
    if args.sweep:
        sweep(s, args.eval)
    if args.trace:
        trace(s, args.trace)
    for method in filter(None, args.calibration.split(",")):
        m = _setup(args.model, args.eval, 0, {"calibration": method})
        print(f"calibration={method}, all int8: F1 {_f1(m, m.chosen, m.held, m.ref_held):.4f}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
