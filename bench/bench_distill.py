"""Distillation vs layer-wise reconstruction on the digits CNN pruned at ratio 0.5.

    .venv/bin/python bench/bench_distill.py [--seeds 0,1,2] [--epochs 20] [--temperature 2]

Trains the teacher (zoo digits_cnn, seed 0), prunes it with ``prune-channels(ratio=0.5)`` (BatchNorms
kept) and reports test accuracy (360 images, onnxruntime) of: fp32, pruned, pruned + ``reconstruct``,
and distillation (KD, temperature 2, alpha 0.7, features at ``down``) for every seed and epoch count,
then ``quantize-int8`` after distillation. Prints a Markdown table; medians over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import onnxforge
from onnxforge.distill import KDConfig, distill
from onnxforge.ir.io import clone
from onnxforge.testing.digits import accuracy, load_digits_split, train_digits_cnn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", default="20")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--features", default="down")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    features = tuple(f for f in args.features.split(",") if f)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    teacher = train_digits_cnn(seed=0)
    model = onnxforge.export(teacher, (torch.from_numpy(x_tr[:1]),))
    calib = {"input": x_tr[:256]}
    student = onnxforge.optimize(clone(model), "prune-channels(ratio=0.5)").model
    recon = onnxforge.optimize(clone(model), "prune-channels(ratio=0.5),reconstruct", calibration_data=calib).model
    rows = [("fp32 teacher", accuracy(model, x_te, y_te), "-"),
            ("prune 0.5", accuracy(student, x_te, y_te), "-"),
            ("prune 0.5 + reconstruct", accuracy(recon, x_te, y_te), "-")]
    for epochs in [int(e) for e in args.epochs.split(",")]:
        accs, accs8, times = [], [], []
        for seed in seeds:
            start = time.perf_counter()
            res = distill(teacher, student, {"input": x_tr, "labels": y_tr},
                          config=KDConfig(epochs=epochs, temperature=args.temperature, features=features,
                                                         seed=seed, threads=1))
            times.append(time.perf_counter() - start)
            accs.append(accuracy(res.model, x_te, y_te))
            q = onnxforge.optimize(res.model, "O1,quantize-int8", calibration_data=calib).model
            accs8.append(accuracy(q, x_te, y_te))
            print(f"epochs {epochs} seed {seed}: {accs[-1]:.4f} int8 {accs8[-1]:.4f} ({times[-1]:.1f} s)", flush=True)
        each = ", ".join(f"{100 * a:.2f}" for a in accs)
        rows.append((f"prune 0.5 + KD {epochs} ep, T {args.temperature:g} (features {','.join(features) or '-'})", statistics.median(accs),
                     f"seeds {each}; {statistics.median(times):.0f} s"))
        rows.append((f"  ... then O1,quantize-int8", statistics.median(accs8),
                     "seeds " + ", ".join(f"{100 * a:.2f}" for a in accs8)))
    print("| model | test accuracy (median) | notes |\n|---|---:|---|")
    for name, acc, note in rows:
        print(f"| {name} | {100 * acc:.2f} % | {note} |")


if __name__ == "__main__":
    main()
