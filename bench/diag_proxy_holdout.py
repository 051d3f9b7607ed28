"""Does ``quantize-int8``'s budget proxy hold on inputs it did not see?

For each suite model and each budget, builds ``O2`` then ``quantize-int8(calibration=sqnr,
bias_correction=true, max_drop=B)`` (no latency guard: the set the budget chose, whatever its speed)
on the calibration split, and prints, per build:

* the proxy the pass budgeted (``fallback.measure``) as it read it on its calibration samples;
* the same proxy on the held-out samples (the fitted set's bias shows as the gap to the first);
* the task metric against fp32 on the held-out samples (what the budget stands for), 95 % interval.

Usage: ``.venv/bin/python bench/diag_proxy_holdout.py --models ocr,orientation,effnet --budgets all,0.01,0.005``
(``all``: no budget, every node int8).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main() -> None:
    import numpy as np
    import onnx

    from bench_real import _outputs, metric_interval
    from onnxforge.api import optimize
    from onnxforge.ir.io import model_to_bytes
    from onnxforge.passes.quantize import calibrate as cal
    from onnxforge.passes.quantize.fallback import class_score_outputs, expected_flips, fidelity_drop
    from onnxforge.runtime.session import make_session
    from onnxforge.testing.real import load_case

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="ocr,orientation,effnet")
    ap.add_argument("--budgets", default="all,0.01")
    ap.add_argument("--extra", default="", help="more quantize-int8 options, e.g. budget_confidence=0.9")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=200)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    rows = []
    for name in args.models.split(","):
        case = load_case(name)
        calib, held = case.calibration_feeds(args.calib), case.eval_feeds(args.eval)
        ref_out = _outputs(make_session(case.model_path.read_bytes(), threads=1, optimize="disable"), held)
        o2 = optimize(onnx.load(str(case.model_path)), "O2").model
        o2_bytes = model_to_bytes(o2)
        axes = class_score_outputs(o2, cal.run_outputs(o2_bytes, calib[:2], optimize=False))
        ref_held = cal.run_outputs(o2_bytes, held, optimize=False)
        for budget in args.budgets.split(","):
            opts = "calibration=sqnr,bias_correction=true" + ("" if budget == "all" else f",max_drop={budget}")
            if args.extra:
                opts += "," + args.extra
            t0 = time.perf_counter()
            r = optimize(onnx.load_from_string(o2_bytes), f"quantize-int8({opts})", calibration_data=calib)
            build_s = time.perf_counter() - t0
            data = model_to_bytes(r.model)
            fb = r.report.records[-1].stats.get("details", {}).get("fallback", {})
            out_held = cal.run_outputs(data, held, optimize=True)
            proxy_held = expected_flips(ref_held, out_held, axes) if axes is not None else fidelity_drop(ref_held, out_held)
            if axes is None or not fb:
                out_cal = cal.run_outputs(data, calib, optimize=True)
                ref_cal = cal.run_outputs(o2_bytes, calib, optimize=False)
                proxy_cal = expected_flips(ref_cal, out_cal, axes) if axes is not None else fidelity_drop(ref_cal, out_cal)
            else:
                proxy_cal = fb.get("drop_final")
            cand = _outputs(make_session(data, threads=1, optimize="all"), held)
            row = {"model": name, "budget": budget, "measure": fb.get("measure", "flips" if axes else "1 - cos"),
                   "kept_float": len(fb.get("kept_float", [])), "proxy_calib": proxy_cal,
                   "proxy_held": proxy_held, "metric": case.metric(ref_out, cand),
                   "metric_ci": metric_interval(case, ref_out, cand), "build_s": round(build_s, 1)}
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)
    print("\n| model | budget | measure | kept float | proxy, calibration | proxy, held-out | metric, held-out [95 %] |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']} | {r['measure']} | {r['kept_float']} | {r['proxy_calib']:.4f} | "
              f"{r['proxy_held']:.4f} | {r['metric']:.3f} [{r['metric_ci'][0]:.3f}, {r['metric_ci'][1]:.3f}] |")
    _ = np


if __name__ == "__main__":
    main()
