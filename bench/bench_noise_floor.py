"""The noise floor of each suite metric: the fp32 model with its weights rounded to fp16 / bf16.

A "within 1 point" goal only means something where the metric is not already moved by any
perturbation of 8-bit precision. This keeps the graph and the activations float and rounds every
float initializer with more than 16 elements to fp16 (10-bit mantissa) or bf16 (7-bit mantissa,
round to nearest even) — about the relative precision of an int8 weight at the top of its range.
The metric against the fp32 model on the same held-out samples as ``bench_real.py`` tells how
much of an int8 model's loss any 8-bit rounding would cost.

    .venv/bin/python bench/bench_noise_floor.py [--models effnet,orientation,det,layout] [--eval 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_real as br  # noqa: E402

from onnxforge.runtime.session import make_session  # noqa: E402
from onnxforge.testing.real import load_case  # noqa: E402


def to_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and back to float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


ROUNDINGS = {"fp16": lambda a: a.astype(np.float16).astype(np.float32), "bf16": to_bf16}


def rounded(model_bytes: bytes, kind: str) -> bytes:
    m = onnx.load_from_string(model_bytes)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.size > 16:
            init.CopyFrom(numpy_helper.from_array(ROUNDINGS[kind](a), init.name))
    return m.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="effnet,orientation,det,layout")
    ap.add_argument("--eval", type=int, default=200, help="held-out samples (bench_real.py's eval split)")
    args = ap.parse_args()
    print("| model | weights | metric vs fp32 [95 %] |\n|---|---|---|")
    for name in args.models.split(","):
        case = load_case(name)
        held = case.eval_feeds(args.eval)
        original = case.model_path.read_bytes()
        ref = br._outputs(make_session(original, threads=1, optimize="disable"), held)
        for kind in ROUNDINGS:
            out = br._outputs(make_session(rounded(original, kind), threads=1, optimize="disable"), held)
            lo, hi = br.metric_interval(case, ref, out)
            print(f"| {name} | {kind} | {case.metric(ref, out):.3f} ({case.metric_name}) [{lo:.3f}, {hi:.3f}] |", flush=True)
            print(json.dumps({"model": name, "weights": kind, "metric": case.metric(ref, out), "ci": [lo, hi]}),
                  file=sys.stderr)


if __name__ == "__main__":
    main()
