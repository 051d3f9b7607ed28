"""Ternary / binary weights: size, accuracy and measured latency against float (size, not speed).

    .venv/bin/python bench/bench_lowbit.py [--rounds 7] [--runs 50]

Models: the bundled demo (examples/digits_cnn.onnx, accuracy on its 360 test images) after O1, then
``quantize-weights-ternary`` / ``-binary`` (first and last layer float by default, and all layers), and
the zoo's ``mlp`` for com.microsoft.MatMulNBits bits=2. Latency: onnxruntime CPU, optimizations on,
1 thread; the variants are timed interleaved in rounds, each round's median kept, the median of those
reported with the ratio to float.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

import onnxforge
from onnxforge.ir.io import model_to_bytes, tensor_bytes
from onnxforge.testing.digits import accuracy


def _session(blob: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def _latency(blobs: dict[str, bytes], feeds: dict[str, np.ndarray], rounds: int, runs: int) -> dict[str, float]:
    sessions = {k: _session(b) for k, b in blobs.items()}
    per = {k: [] for k in blobs}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feeds)
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times.append(time.perf_counter() - t)
            per[k].append(statistics.median(times))
    return {k: statistics.median(v) * 1e6 for k, v in per.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    data = np.load("examples/digits_data.npz")
    variants = {
        "fp32 (O1)": "O1",
        "ternary": "O1,quantize-weights-ternary",
        "ternary, all layers": "O1,quantize-weights-ternary(keep_first_last=false)",
        "binary": "O1,quantize-weights-binary",
        "binary, all layers": "O1,quantize-weights-binary(keep_first_last=false)",
    }
    rows = []
    blobs = {}
    for name, spec in variants.items():
        model = onnxforge.optimize("examples/digits_cnn.onnx", spec).model
        blobs[name] = model_to_bytes(model)
        rows.append((name, len(blobs[name]), tensor_bytes(model), accuracy(model, data["x_test"], data["y_test"])))
    lat = _latency(blobs, {"input": data["x_test"][:1]}, args.rounds, args.runs)
    lat64 = _latency(blobs, {"input": data["x_test"][:64]}, args.rounds, max(5, args.runs // 5))
    print("| digits CNN | file bytes | weight bytes | accuracy | latency b1 (µs) | ratio | latency b64 (µs) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0][0]
    for name, size, wbytes, acc in rows:
        print(f"| {name} | {size:,} | {wbytes:,} | {100 * acc:.2f} % | {lat[name]:.1f} | {lat[name] / lat[base]:.2f} "
              f"| {lat64[name]:.1f} | {lat64[name] / lat64[base]:.2f} |")

    from onnxforge.testing import zoo

    mlp = zoo.export_model("mlp")
    mblobs = {"float": model_to_bytes(mlp)}
    for mode in ("ternary", "binary"):
        q = onnxforge.optimize(model_to_bytes(mlp), f"quantize-weights-{mode}(keep_first_last=false)").model
        mblobs[f"{mode} (MatMulNBits bits=2)"] = model_to_bytes(q)
        q = onnxforge.optimize(model_to_bytes(mlp), f"quantize-weights-{mode}(keep_first_last=false,matmul_nbits=false)").model
        mblobs[f"{mode} (packed constant)"] = model_to_bytes(q)
    shape = [d if isinstance(d, int) else 1 for d in mlp.graph.inputs[0].shape]
    for batch in (1, 64):
        feeds = {mlp.graph.inputs[0].name: np.random.default_rng(0).standard_normal([batch] + shape[1:]).astype(np.float32)}
        mlat = _latency(mblobs, feeds, args.rounds, args.runs)
        print(f"\n| zoo mlp, batch {batch} | file bytes | latency (µs) | ratio |\n|---|---:|---:|---:|")
        for name, blob in mblobs.items():
            print(f"| {name} | {len(blob):,} | {mlat[name]:.1f} | {mlat[name] / mlat['float']:.2f} |")


if __name__ == "__main__":
    main()
