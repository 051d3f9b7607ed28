"""Where int8 loses detection F1, node by node, and which cheap proxy finds it (issue 11, task D).

For a detector of the trained-model suite (``det``, ``layout``), quantize the O2 model as the
``int8-nearest`` row of ``bench_real.py`` does (``quantize-int8(calibration=sqnr,bias_correction=true)``,
one :class:`~onnxforge.passes.quantize.qdq.QuantContext` for every build, as ``fallback.py`` builds
its candidates) and, for every weighted node ``i``:

* **only i int8** (``qc.build({i})``): held-out cost ``1 - F1`` against the fp32 model on
  ``--held`` eval samples, and the proxies below on the first ``--proxy`` calibration samples;
* **all int8 but i** (``select(model, analysis, {i})``, as fallback's ``subset``): held-out gain
  ``F1(all but i) - F1(all)``.

Plus, all int8 with one *non-weighted* op type left float (Concat, Resize, Add, Sigmoid, ...) and
with every non-weighted op float.

Proxies (each on the one-node model vs the float O2 model on calibration samples, higher = worse):

* ``cos``: the worst output's ``1 - mean cosine`` (``fallback.fidelity_drop``, O3's budget for detectors);
* ``chan``: ``fallback.output_error``: per channel ``sum(d^2) / sum((r - mean r)^2)``, mean over
  channels and outputs (the ranking of O3 today);
* ``score``: the same relative squared error on the decoded **scores** only (det: ``obj * cls``,
  ``(A, C)``; layout: the per-level class-score outputs, already sigmoid);
* ``hot``: mean ``|s_int8 - s|`` over the (anchor, class) score entries where either model is above
  half the decode threshold (det 0.05, layout 0.25): the scores that can change a detection;
* ``flips``: share of (anchor, class) entries on the other side of the decode threshold
  (det 0.1, layout 0.5), relative to the float model's count above it;
* ``f1``: ``1 - F1`` of the decoded detections on the calibration samples (the task metric itself).

Then Spearman rank correlation of each proxy with the held-out costs (one-node cost and
leave-one-float gain) and the overlap of the top-k sets. Bench-only diagnosis code, no unit tests.

    .venv/bin/python bench/diag_int8_layers.py --models det --held 64 --proxy 16 --json det_layers.json
    .venv/bin/python bench/diag_int8_layers.py --from-json det_layers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from onnxforge.runtime.session import make_session  # noqa: E402
from onnxforge.testing.real import load_case  # noqa: E402

INT8_OPTIONS = {"calibration": "sqnr"}  # + bias correction below: the int8-nearest row of bench_real
DECODE_THR = {"det": 0.1, "layout": 0.5}


def score_tensor(name: str, out_names: list[str], outs: list[np.ndarray]) -> np.ndarray:
    """The decoded scores ``(anchors, classes)`` of one feed (batch 1)."""
    by = dict(zip(out_names, outs))
    if name == "det":
        pred = np.asarray(by[out_names[0]][0], np.float64)
        return pred[:, 4:5] * pred[:, 5:]
    half = len(out_names) // 2  # layout: scores of each level, then distances (cases.load_case)
    return np.concatenate([np.asarray(by[n][0], np.float64) for n in out_names[:half]])


def proxies(case, name: str, out_names: list[str], ref: list[list[np.ndarray]],
            outs: list[list[np.ndarray]]) -> dict[str, float]:
    from onnxforge.passes.quantize.fallback import fidelity_drop, output_error

    thr = DECODE_THR[name]
    s_r = np.concatenate([score_tensor(name, out_names, r) for r in ref])
    s_o = np.concatenate([score_tensor(name, out_names, o) for o in outs])
    d = s_o - s_r
    spread = np.sum((s_r - s_r.mean(axis=0)) ** 2, axis=0)
    score = float(np.mean(np.sum(d * d, axis=0) / np.maximum(spread, 1e-12 * max(spread.max(), 1e-30))))
    hot = (s_r > thr / 2) | (s_o > thr / 2)
    flips = np.count_nonzero((s_r > thr) != (s_o > thr)) / max(1, np.count_nonzero(s_r > thr))
    dicts = lambda rows: [dict(zip(out_names, r)) for r in rows]  # noqa: E731
    return {"cos": fidelity_drop(ref, outs), "chan": output_error(ref, outs), "score": score,
            "hot": float(np.abs(d[hot]).mean()) if hot.any() else 0.0, "flips": float(flips),
            "f1": 1.0 - case.metric(dicts(ref), dicts(outs))}


class Setup:
    """The case, its O2 model, one QuantContext (sqnr calibration + bias correction) and the references."""

    def __init__(self, name: str, n_calib: int, n_held: int, n_proxy: int, rounding: str = "nearest",
                 options: dict | None = None):
        from onnxforge.api import optimize
        from onnxforge.passes import PassContext, create_pass
        from onnxforge.passes.base import PassStats
        from onnxforge.passes.quantize.analysis import select
        from onnxforge.passes.quantize.bias_correction import bias_correction
        from onnxforge.passes.quantize.gptq import gptq_rounding

        t0 = time.perf_counter()
        self.name = name
        self.case = case = load_case(name)
        self.calib, self.held = case.calibration_feeds(n_calib), case.eval_feeds(n_held)
        self.proxy_feeds = self.calib[:n_proxy]
        original = case.model_path.read_bytes()
        self.ref_held = self.run(original, self.held, "disable")
        self.o2 = optimize(onnx.load(str(case.model_path)), "O2").model
        # the QuantContext (calibration, GPTQ, bias correction: minutes on the shared cores) is cached
        # between runs of this script, keyed by the O2 model, the options and the calibration size
        import hashlib

        import onnx_ir as ir

        key = hashlib.sha1(ir.serde.serialize_model(self.o2).SerializeToString())
        options = dict(INT8_OPTIONS if options is None else options)
        key.update(repr((sorted(options.items()), n_calib, rounding)).encode())
        cache = os.path.join(tempfile.gettempdir(), f"diag_int8_{name}_{key.hexdigest()[:12]}.pkl")
        qc = None
        if os.path.exists(cache):
            with open(cache, "rb") as fh:
                qc = pickle.load(fh)
        if qc is None:
            p = create_pass("quantize-int8", options, PassContext(calibration_data=self.calib))
            qc = p.prepare(self.o2, PassStats())
            chosen = select(self.o2, qc.analysis, set(), target=qc.target)
            if rounding == "gptq":
                qc.weight_rounding = gptq_rounding(qc, chosen, PassStats())
            qc.bias_delta = bias_correction(qc, chosen, PassStats())
            with contextlib.suppress(Exception), open(cache, "wb") as fh:
                pickle.dump(qc, fh)
        self.qc = qc
        self.chosen = select(self.o2, qc.analysis, set(), target=qc.target)
        self.infos = qc.analysis.infos
        self.weighted = sorted(i for i in self.chosen if self.infos[i].role == "weighted")
        self.out_names = [o.name for o in self.o2.graph.outputs]
        # the proxies compare with the float O2 model as fallback's _Scorer does (ORT_DISABLE_ALL)
        self.ref_proxy = self.run(qc.float_bytes, self.proxy_feeds, "disable", as_dict=False)
        self._model = qc.fresh()
        print(f"{name}: set up in {time.perf_counter() - t0:.0f}s: {len(self.chosen)} nodes to quantize, "
              f"{len(self.weighted)} weighted", flush=True)

    def run(self, model, feeds, optimize: str = "all", as_dict: bool = True):
        sess = make_session(model, threads=1, optimize=optimize).session
        names = [o.name for o in sess.get_outputs()]
        rows = [sess.run(None, f) for f in feeds]
        if not as_dict:
            order = [names.index(n) for n in self.out_names]  # by name, in the O2 model's output order
            return [[r[k] for k in order] for r in rows]
        return [dict(zip(names, r)) for r in rows]

    def subset(self, forced_float: set[int]) -> set[int]:
        from onnxforge.passes.quantize.analysis import select

        return select(self._model, self.qc.analysis, set(forced_float), target=self.qc.target) & self.chosen

    def held_f1(self, chosen: set[int], n: int | None = None) -> tuple[float, list[dict]]:
        out = self.run(self.qc.build(set(chosen)), self.held[:n])
        return self.case.metric(self.ref_held[: len(out)], out), out

    def evaluate(self, chosen: set[int], with_proxies: bool = True, n_held: int | None = None) -> dict:
        model = self.qc.build(set(chosen))
        r = {}
        if n_held != 0:
            out = self.run(model, self.held[:n_held])
            r["f1_held"] = self.case.metric(self.ref_held[: len(out)], out)
        if with_proxies:
            outs = self.run(model, self.proxy_feeds, as_dict=False)
            r.update(proxies(self.case, self.name, self.out_names, self.ref_proxy, outs))
        return r

    def describe(self, i: int) -> dict:
        from onnxforge.ir.graph import const_value

        node = list(self._model.graph)[i]
        info = self.infos[i]
        w = const_value(node.inputs[info.weight_input])
        g = node.attributes.get("group")
        return {"index": i, "name": info.name, "op": info.op_type, "weight": list(w.shape),
                "group": int(g.value) if g is not None else 1}


def sweep(name: str, n_calib: int, n_held: int, n_proxy: int, rounding: str, limit: int | None = None,
          only_held: int | None = None, skip: int = 0, types: bool = True) -> dict:
    s = Setup(name, n_calib, n_held, n_proxy, rounding)
    t0 = time.perf_counter()
    base = s.evaluate(s.chosen)
    weighted_only = s.evaluate(set(s.weighted), with_proxies=False)
    print(f"{name}: all int8 F1 {base['f1_held']:.4f}; weighted nodes only int8 {weighted_only['f1_held']:.4f}",
          flush=True)
    by_type: dict[str, float] = {}
    types = sorted({s.infos[i].op_type for i in s.chosen if s.infos[i].role != "weighted"}) if types else []
    for t in types:
        rest = {i for i in s.chosen if s.infos[i].op_type != t}
        by_type[t] = s.evaluate(rest, with_proxies=False)["f1_held"]
        print(f"  all int8 but {t} float: F1 {by_type[t]:.4f}", flush=True)
    nodes = []
    for k, i in enumerate(s.weighted[:limit]):
        if k < skip:
            continue
        one = s.evaluate({i}, n_held=only_held)
        but = s.evaluate(s.subset({i}), with_proxies=False)["f1_held"]
        row = dict(s.describe(i), only=one, all_but=but)
        nodes.append(row)
        cost = f"{1 - one['f1_held']:.4f}" if "f1_held" in one else "-"
        print(f"  [{k + 1}/{len(s.weighted)} {time.perf_counter() - t0:.0f}s] {row['name']} {row['weight']}: "
              f"only-int8 cost {cost}, float-gain {but - base['f1_held']:+.4f}; "
              + " ".join(f"{p}={one[p]:.3g}" for p in ("cos", "chan", "score", "hot", "flips", "f1")), flush=True)
    return {"model": name, "rounding": rounding, "n_held": n_held, "n_proxy": n_proxy, "n_calib": n_calib,
            "n_held_only": only_held if only_held is not None else n_held,
            "all_int8": base, "weighted_only_int8": weighted_only["f1_held"], "all_but_type_float": by_type,
            "nodes": nodes}


PROXIES = ("cos", "chan", "score", "hot", "flips", "f1")


def analyse(res: dict, ks=(3, 5, 10)) -> str:
    from scipy.stats import spearmanr

    nodes = res["nodes"]
    base = res["all_int8"]["f1_held"]
    # one-node cost: nan where not measured (--only-held 0, or measured later for a few nodes)
    cost = np.array([1 - n["only"]["f1_held"] if "f1_held" in n["only"] else np.nan for n in nodes])
    gain = np.array([n["all_but"] - base for n in nodes])
    lines = [f"### {res['model']} ({res['rounding']} weights; {len(nodes)} weighted nodes; held-out {res['n_held']}, "
             f"proxies on {res['n_proxy']} calibration samples)",
             f"all int8 F1 {base:.4f}; weighted nodes only {res['weighted_only_int8']:.4f}; "
             + ", ".join(f"{t} float {v:.4f}" for t, v in res["all_but_type_float"].items()), ""]
    has_cost = ~np.isnan(cost)
    order_c = np.argsort(-np.nan_to_num(cost, nan=-1.0), kind="stable")[: int(has_cost.sum())]
    order_g = np.argsort(-gain, kind="stable")
    lines.append("| top by | node | weight | group | only-int8 cost | float-gain | " + " | ".join(PROXIES) + " |")
    lines.append("|---|---|---|---|---|---|" + "---|" * len(PROXIES))
    for label, order in (("cost", order_c[:6]), ("gain", order_g[:6])):
        for j in order:
            n = nodes[j]
            if np.isnan(cost[j]) and label == "cost":
                continue
            lines.append(f"| {label} | {n['name']} | {'x'.join(map(str, n['weight']))} | {n['group']} | "
                         f"{cost[j]:.4f} | {gain[j]:+.4f} | "
                         + " | ".join(f"{n['only'][p]:.3g}" for p in PROXIES) + " |")
    lines += ["", "| proxy | Spearman vs only-int8 cost | vs float-gain | "
              + " | ".join(f"top-{k} overlap (cost / gain)" for k in ks) + " |",
              "|---|---|---|" + "---|" * len(ks)]
    for p in PROXIES:
        v = np.array([n["only"][p] for n in nodes])
        rc = spearmanr(v[has_cost], cost[has_cost]).statistic if has_cost.sum() > 2 else np.nan
        rg = spearmanr(v, gain).statistic
        top = np.argsort(-v, kind="stable")
        topc = [j for j in top if has_cost[j]]  # among the nodes whose one-node cost was measured
        ov = [f"{len(set(topc[:k]) & set(order_c[:k]))}/{k} / {len(set(top[:k]) & set(order_g[:k]))}/{k}" for k in ks]
        lines.append(f"| {p} | {rc:+.2f} | {rg:+.2f} | " + " | ".join(ov) + " |")
    if has_cost.sum() > 2:
        rc = spearmanr(cost[has_cost], gain[has_cost]).statistic
        lines.append(f"\nonly-int8 cost vs float-gain (the two held-out measures, {int(has_cost.sum())} nodes): "
                     f"Spearman {rc:+.2f}")
    return "\n".join(lines)


def search(name: str, sweep_res: dict, order_by: str, n_calib: int, n_held: int, rounding: str,
           target: float = 0.99, sizes=(0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)) -> dict:
    """F1 on ``n_held`` samples with the first k weighted nodes of an order kept float (the rest int8,
    non-weighted ops as ``select`` decides), for growing k until ``target``. ``order_by``: ``gain``
    (held-out leave-one-float gain: an oracle, chosen on the sweep's held-out samples), ``cost``
    (held-out one-node cost) or a proxy name (calibration samples only)."""
    s = Setup(name, n_calib, n_held, 1, rounding)
    nodes = sweep_res["nodes"]
    base = sweep_res["all_int8"]["f1_held"]
    key = {"gain": lambda n: n["all_but"] - base, "cost": lambda n: 1 - n["only"]["f1_held"]}.get(
        order_by, lambda n: n["only"][order_by])
    index = {s.infos[i].name: i for i in s.weighted}
    order = [index[n["name"]] for n in sorted(nodes, key=lambda n: -key(n))]
    names = {index[n["name"]]: n["name"] for n in nodes}
    steps = []
    for k in sizes:
        if k > len(order):
            break
        f1, _ = s.held_f1(s.subset(set(order[:k])))
        steps.append({"k": k, "f1": f1, "float": [names[i] for i in order[:k]]})
        print(f"  {name} by {order_by}: {k} float -> F1 {f1:.4f} ({', '.join(names[i] for i in order[:k][-4:])})",
              flush=True)
        if f1 >= target:
            break
    return {"model": name, "order_by": order_by, "n_held": n_held, "rounding": rounding, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="det,layout")
    ap.add_argument("--calib", type=int, default=32, help="calibration samples (ranges, bias correction)")
    ap.add_argument("--held", type=int, default=64, help="held-out samples for the F1 costs")
    ap.add_argument("--proxy", type=int, default=8, help="calibration samples for the proxies (fallback: 8)")
    ap.add_argument("--rounding", default="nearest", choices=("nearest", "gptq"))
    ap.add_argument("--only-held", type=int, default=None,
                    help="held-out samples for the one-node-int8 cost (default --held; 0: skip it)")
    ap.add_argument("--skip", type=int, default=0, help="start at the N-th weighted node (split a sweep)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N weighted nodes (a smoke run)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--from-json", default=None, help="only print the analysis of a saved --json run")
    ap.add_argument("--search", default=None, metavar="ORDER[,ORDER]",
                    help="with --from-json: the smallest float prefix of each order (gain, cost or a proxy) "
                         "that reaches F1 --target on --held samples")
    ap.add_argument("--target", type=float, default=0.99)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    if args.from_json and args.search:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        found = [search(res["model"], res, order, args.calib, args.held, args.rounding, args.target)
                 for res in saved for order in args.search.split(",")]
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(found, fh, indent=1, default=float)
        return
    if args.from_json:
        with open(args.from_json) as fh:
            for res in json.load(fh):
                print(analyse(res) + "\n")
        return
    results = []
    for name in args.models.split(","):
        results.append(sweep(name, args.calib, args.held, args.proxy, args.rounding, args.limit, args.only_held,
                             args.skip, types=args.skip == 0))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1, default=float)
        print(analyse(results[-1]), flush=True)


if __name__ == "__main__":
    main()
