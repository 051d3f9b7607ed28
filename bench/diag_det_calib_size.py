"""Does more calibration data close det's int8 gap (issue 11)? F1 vs calibration set size.

The trained-model suite's YOLOX detector quantized all-int8 (``k=0``) and with its first ``k`` convs
float, ``quantize-int8(calibration=METHOD, bias_correction=true)`` on the first N calibration-split
captchas, for every N and k given; F1 at IoU 0.5 against the fp32 model on held-out samples 0-199
and 200-399::

    .venv/bin/python bench/diag_det_calib_size.py 32,200,512 0,4 [sqnr]

Bench-only diagnosis, no unit tests; figures in BENCHMARKS.md (Trained-model suite, run 12).
"""
from __future__ import annotations

import json
import os
import sys
import time

import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_real import _outputs, make_session  # noqa: E402
from diag_det_prune_distill import FIRST12  # noqa: E402

from onnxforge.api import optimize  # noqa: E402
from onnxforge.ir.io import model_to_bytes  # noqa: E402
from onnxforge.testing.real.cases import load_case  # noqa: E402


def main() -> None:
    sizes = [int(x) for x in sys.argv[1].split(",")]
    float_first = [int(x) for x in sys.argv[2].split(",")]
    method = sys.argv[3] if len(sys.argv) > 3 else "sqnr"
    case = load_case("det")
    original = case.model_path.read_bytes()
    held = case.eval_feeds(400)
    ref = _outputs(make_session(original, threads=1, optimize="disable"), held)
    feeds = case.calibration_feeds(max(sizes))
    for n in sizes:
        for k in float_first:
            exclude = "" if k == 0 else ",exclude=" + json.dumps(FIRST12[:k]).replace(" ", "")
            t0 = time.perf_counter()
            r = optimize(onnx.load_from_string(original),
                         f"O2,quantize-int8(calibration={method},bias_correction=true{exclude})",
                         calibration_data=feeds[:n])
            out = _outputs(make_session(model_to_bytes(r.model), threads=2, optimize="all"), held)
            print(f"N={n}, first {k} float, {method}: F1 {case.metric(ref[:200], out[:200]):.4f} / "
                  f"{case.metric(ref[200:], out[200:]):.4f} (build {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
