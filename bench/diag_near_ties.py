"""Where an int8 model's changed answers fall: by how sure the fp32 model was of its own answer.

Issue 11 asks each suite model's task metric within 1 point of fp32, and names agreement with the
fp32 model as the metric for the classifiers and the recognizer. This script asks what such an
agreement is made of. For each model and each row (a ``bench_real.py`` row, built on the
calibration split), on the held-out samples:

* the fp32 model's **margin** per sample: its probability of its answer minus that of the runner-up
  (``p1 - p2`` of the softmax; for the recognizer the smallest margin over the string's time steps,
  since any one step can change the string) - a margin near 0 is a coin toss the fp32 model itself
  makes;
* per margin bin: how many samples, how many answers the row changed, and the accuracy of fp32 and
  of the row against the truth where the suite knows it (ocr: the text rendered; orientation: the
  rotation; effnet has none);
* the agreement on the samples with margin >= ``--decisive`` (default 0.1), with its 95 % interval,
  and each of those samples the row changed (its kind where the suite mixes kinds: orientation's
  document pages and photos).

The class scores are the graph outputs (effnet's logits, orientation's softmax); the recognizer
arg-maxes inside its graph, so the ArgMax's input is added as an extra output of both models.

Usage: ``.venv/bin/python bench/diag_near_ties.py --models effnet,orientation,ocr --rows O3,int8-nearest``
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 1.0 + 1e-9)


def expose_scores(model_bytes: bytes) -> tuple[bytes, str | None]:
    """The model with the input of the ArgMax that makes its (only) output added as an output, and
    that tensor's name; unchanged and None when the output is not an ArgMax (scores already)."""
    import onnx

    m = onnx.load_from_string(model_bytes)
    out = m.graph.output[0].name
    producer = {o: n for n in m.graph.node for o in n.output}
    node = producer.get(out)
    while node is not None and node.op_type in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Transpose"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "ArgMax":
        return model_bytes, None
    scores = node.input[0]
    m.graph.output.append(onnx.helper.make_tensor_value_info(scores, onnx.TensorProto.FLOAT, None))
    return m.SerializeToString(), scores


def probabilities(scores):
    """Softmax over the last axis, unless the scores already are probabilities."""
    import numpy as np

    s = np.asarray(scores, np.float64)
    if s.min() >= 0 and np.allclose(s.sum(-1), 1.0, atol=1e-3):
        return s
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def margin(scores) -> float:
    """``p1 - p2`` of the fp32 model: per row of class scores, the smallest over a sequence."""
    import numpy as np

    p = probabilities(scores).reshape(-1, np.asarray(scores).shape[-1])
    top2 = np.sort(p, axis=-1)[:, -2:]
    return float((top2[:, 1] - top2[:, 0]).min())


def main() -> None:
    import numpy as np
    import onnx

    from bench_real import ROWS, build_row, wilson
    from onnxforge.runtime.session import make_session
    from onnxforge.testing.real import load_case

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="effnet,orientation,ocr")
    ap.add_argument("--rows", default="O3")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--decisive", type=float, default=0.1, help="the margin from which a sample counts as decisive")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    for name in args.models.split(","):
        case = load_case(name)
        fp32 = case.model_path.read_bytes()
        calib, feeds = case.calibration_feeds(args.calib), case.eval_feeds(args.eval)
        labels, kinds = case.eval_labels(args.eval), case.eval_kinds(args.eval)

        def run(model_bytes: bytes, optimize: str = "all"):
            exposed, scores_name = expose_scores(model_bytes)
            info = make_session(exposed, threads=1, optimize=optimize)
            names = [o.name for o in info.session.get_outputs()]
            outs = [dict(zip(names, info.session.run(None, f))) for f in feeds]
            first = onnx.load_from_string(model_bytes).graph.output[0].name
            answers = [case.decode({first: o[first]}) for o in outs]
            scores = [o[scores_name or first] for o in outs]
            return answers, scores

        ref_answers, ref_scores = run(fp32, "disable")
        margins = np.array([margin(s) for s in ref_scores])
        ref_right = None if labels is None else np.array([a == y for a, y in zip(ref_answers, labels)])
        print(f"\n== {name}: fp32 margin p1 - p2 on {len(feeds)} held-out samples: median {np.median(margins):.3f}, "
              f"{(margins < args.decisive).sum()} below {args.decisive}")
        for label in args.rows.split(","):
            answers, _ = run(build_row(ROWS[label], fp32, calib, case))
            changed = np.array([a != r for a, r in zip(answers, ref_answers)])
            right = None if labels is None else np.array([a == y for a, y in zip(answers, labels)])
            print(f"-- {name} / {label}: {changed.sum()} of {len(changed)} answers changed "
                  f"(agreement {1 - changed.mean():.3f})")
            print("| margin p1 − p2 | samples | changed | fp32 accuracy | row accuracy |")
            print("|---|---|---|---|---|")
            for lo, hi in zip(BINS[:-1], BINS[1:]):
                sel = (margins >= lo) & (margins < hi)
                if not sel.any():
                    continue
                acc = ("—", "—") if right is None else (f"{ref_right[sel].mean():.3f}", f"{right[sel].mean():.3f}")
                print(f"| [{lo:.2f}, {min(hi, 1.0):.2f}) | {sel.sum()} | {changed[sel].sum()} | {acc[0]} | {acc[1]} |")
            dec = margins >= args.decisive
            k = int((~changed[dec]).sum())
            lo_ci, hi_ci = wilson(k, int(dec.sum()))
            for i in np.flatnonzero(dec & changed):  # the decisive samples the row changed, one by one
                kind = "" if kinds is None else f" ({kinds[i]})"
                truth = "" if labels is None else f", truth {labels[i]!r}"
                print(f"  sample {i}{kind}: margin {margins[i]:.3f}, fp32 {ref_answers[i]!r} -> {answers[i]!r}{truth}")
            print(f"agreement where fp32's margin >= {args.decisive}: {k}/{dec.sum()} = {k / max(dec.sum(), 1):.3f} "
                  f"[{lo_ci:.3f}, {hi_ci:.3f}]; changed answers below it: {changed[~dec].sum()} of {changed.sum()}")


if __name__ == "__main__":
    main()
