"""Can a light channel cut, recovered by distillation, stack with int8 on the YOLOX detector (issue 12)?

For the trained-model suite's ``det`` (ddddocr's YOLOX captcha detector), this builds:

1. ``prune-channels(target_latency=1.0, target_flops=F), reconstruct, O1`` on the first 32
   calibration-split captchas (the latency-aware cut of BENCHMARKS.md, Pruning run 6, at a lighter F);
2. that model after ``distill(loss=auto)`` against the original on ``--n-train`` calibration-split
   captchas for ``--epochs`` epochs (the model's batch is fixed at 1: it trains sample by sample);
3. each of the two quantized all-int8 and with the first 12 convs float (Trained-model suite, run 10:
   where det's int8 loss enters), ``quantize-int8(calibration=sqnr, bias_correction=true)`` on 32 captchas.

It prints F1 at IoU 0.5 against the fp32 model on held-out samples 0-199 and 200-399 (neither split
seen by any step), and each model's thread CPU time over the original's at ORT_ENABLE_ALL, one
intra-op thread, interleaved (:func:`onnxforge.passes.prune.latency.timed`)::

    .venv/bin/python bench/diag_det_prune_distill.py --flops 0.85 --n-train 2048 --epochs 6

Bench-only diagnosis, no unit tests; figures in BENCHMARKS.md (Pruning, run 7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_real import _outputs, make_session  # noqa: E402

from onnxforge.api import optimize  # noqa: E402
from onnxforge.ir.io import model_to_bytes  # noqa: E402
from onnxforge.passes import PassContext  # noqa: E402
from onnxforge.passes.prune.latency import timed  # noqa: E402
from onnxforge.testing.real.cases import load_case  # noqa: E402

# det's first 12 convs in graph order: the Focus stem and the first CSP stage (run 10)
FIRST12 = ["Conv_41", "Conv_44", "Conv_47", "Conv_50", "Conv_53", "Conv_56", "Conv_61", "Conv_64", "Conv_67",
           "Conv_70", "Conv_73", "Conv_76"]
INT8 = "O2,quantize-int8(calibration=sqnr,bias_correction=true{})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flops", type=float, default=0.85, help="target_flops of the cut")
    ap.add_argument("--n-train", type=int, default=2048, help="calibration-split captchas distill trains on")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()

    import onnx_ir as ir

    case = load_case("det")
    original = case.model_path.read_bytes()
    held = case.eval_feeds(400)
    ref = _outputs(make_session(original, threads=1, optimize="disable"), held)
    feeds = case.calibration_feeds(max(args.n_train, 32))

    t0 = time.perf_counter()
    pruned = optimize(onnx.load_from_string(original),
                      f"prune-channels(target_latency=1.0,target_flops={args.flops}),reconstruct,O1",
                      calibration_data=feeds[:32])
    floats = {"pruned": model_to_bytes(pruned.model)}
    print(f"pruned + reconstruct: {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    teacher = PassContext(reference_model=ir.serde.deserialize_model(onnx.load_from_string(original)))
    distilled = optimize(onnx.load_from_string(floats["pruned"]),
                         f"distill(loss=auto,epochs={args.epochs},max_samples={args.n_train},threads=2)",
                         calibration_data=feeds[: args.n_train], context=teacher)
    floats["pruned+distill"] = model_to_bytes(distilled.model)
    print(f"distill: {time.perf_counter() - t0:.0f} s", flush=True)

    variants = {"original (ort-all)": original, **floats}
    exclude = ",exclude=" + json.dumps(FIRST12).replace(" ", "")
    for name, blob in floats.items():
        for tag, extra in (("int8", ""), ("int8, first 12 float", exclude)):
            q = optimize(onnx.load_from_string(blob), INT8.format(extra), calibration_data=feeds[:32])
            variants[f"{name}, {tag}"] = model_to_bytes(q.model)
    f1 = {}
    for name, blob in variants.items():
        out = _outputs(make_session(blob, threads=2, optimize="all"), held)
        f1[name] = (case.metric(ref[:200], out[:200]), case.metric(ref[200:], out[200:]))
    cpu = timed(variants, held[0], rounds=args.rounds)
    base = cpu["original (ort-all)"]
    print(f"\ndet, target_flops={args.flops}, distill {args.n_train} x {args.epochs} epochs\n")
    print("| model | CPU time × ort-all | F1 vs fp32, samples 0–199 | F1, samples 200–399 |")
    print("|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {cpu[name] / base:.3f} | {f1[name][0]:.3f} | {f1[name][1]:.3f} |")


if __name__ == "__main__":
    main()
