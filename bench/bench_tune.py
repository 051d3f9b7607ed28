"""How much of an exhaustive grid does ``onnxforge tune``'s search need? (BENCHMARKS.md, ``## Tune``)

For each model: evaluate the whole grid of a search space (every candidate built, scored, timed
interleaved with the original), then run the Optuna search (TPE, constrained by --max-drop) with a
budget of a quarter of the grid, for several seeds. The search reads the grid's results from the
shared cache, so both see the *same* measurements; the search's cost is the number of distinct
candidates it asked for (its budget), which is what a fresh search would evaluate.

Reported: grid size, search budget, the grid's best latency ratio within the accuracy budget, the
search's chosen candidate's ratio (from the same grid measurements), their quotient, and a final
interleaved re-timing of the two pipelines side by side (chosen / grid best; 1.0 = equally fast).

    python bench/bench_tune.py                      # digits CNN and mobilenetv2_style
    python bench/bench_tune.py --models digits --seeds 0 1 2
    python bench/bench_tune.py --suite orientation effnet --budget 12   # trained models, task metric
    cd bench && ../.venv/bin/python bench_tune.py --suite det layout --budget 4 --space tune_int8_space.toml
        # mixed-precision int8: quantize-int8(max_drop=...) measured in the suite's metric (Tune run 4)

``--suite``: ``onnxforge tune`` with the *default* space (target_latency, criterion, reconstruct,
int8 / dynamic, fuse), ``--max-drop 1`` point of the suite's task metric against the fp32 model
(``--metric bench_tune:suite_metric``, the three-parameter form), tuned on ``eval_feeds`` 0..n-1
and judged on feeds n..2n-1 that the tuner did not see; the chosen model's latency is re-timed
interleaved with the original (ratio of wall-clock medians, and of thread-CPU-time medians, which
is the figure to read on a loaded shared machine; batch 1, 1 thread).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

REPO = pathlib.Path(__file__).resolve().parent.parent

BENCH_SPACE = {
    "base": "O1",
    "space": [
        {"pass": "prune-channels", "optional": True,
         "options": {"ratio": {"low": 0.1, "high": 0.5, "step": 0.1}, "criterion": ["l1", "activation"]}},
        {"pass": "reconstruct", "optional": True, "requires": "prune-channels"},
        {"pass": "quantize-int8", "optional": True,
         "options": {"calibration": ["minmax", "percentile", "entropy"]}},
    ],
}


def _digits(tmp: pathlib.Path):
    data = np.load(REPO / "examples" / "digits_data.npz")
    np.savez(tmp / "calib.npz", input=data["input"][:64])
    arrays = {"input": data["x_test"], "labels": data["y_test"]}
    return REPO / "examples" / "digits_cnn.onnx", tmp / "calib.npz", arrays, "top1", 1.0


def _zoo(name: str, tmp: pathlib.Path):
    from onnxforge.ir.io import save
    from onnxforge.testing import zoo

    model = zoo.export_cached(name, cache_dir=REPO / ".onnxforge-cache" / "zoo")
    path = tmp / f"{name}.onnx"
    save(model, path)
    inp = model.graph.inputs[0].name
    shape = zoo._get(name).input_shape
    rng = np.random.default_rng(0)
    np.savez(tmp / "calib.npz", **{inp: rng.standard_normal((16, *shape)).astype(np.float32)})
    arrays = {inp: rng.standard_normal((32, *shape)).astype(np.float32)}
    # Untrained weights: fidelity to the original is the metric (cosine >= 0.99).
    return path, tmp / "calib.npz", arrays, "cosine", 0.01


def run(model_name: str, seeds: list[int], batch: int, fraction: float, rounds: int = 10, per_round: int = 5) -> dict:
    from onnxforge.runtime.bench import bench_interleaved
    from onnxforge.runtime.session import make_session
    from onnxforge.tune.evaluate import EvalSettings, Evaluator, EvalSpec
    from onnxforge.tune.runner import tune
    from onnxforge.tune.search import choose
    from onnxforge.tune.space import space_from_dict

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_tune_"))
    path, calib, arrays, metric, max_drop = _digits(tmp) if model_name == "digits" else _zoo(model_name, tmp)
    space = space_from_dict(BENCH_SPACE)
    size = len(space.grid())
    settings = EvalSettings(metric=metric, max_drop=max_drop, batch_size=batch, rounds=rounds, per_round=per_round)
    cache = tmp / "cache"
    t0 = time.perf_counter()
    grid = tune(path, eval_data=arrays, calibration_data=calib, space=space, settings=settings, strategy="grid",
                budget=size, cache_dir=cache, refine=0, write=False).result
    grid_s = time.perf_counter() - t0
    grid_by = {c.pipeline: c for c in grid.candidates}
    grid_best = choose(grid.candidates, max_drop, None)
    budget = max(1, int(size * fraction))
    rows = []
    for seed in seeds:
        settings_s = EvalSettings(metric=metric, max_drop=max_drop, batch_size=batch, rounds=rounds, per_round=per_round)
        res = tune(path, eval_data=arrays, calibration_data=calib, space=space, settings=settings_s,
                   strategy="optuna", budget=budget, seed=seed, pass_seed=0, cache_dir=cache, refine=0, write=False).result
        chosen = res.chosen
        # Passes run with seed 0 in both, so the search's candidates come from the grid's cache.
        same = grid_by.get(chosen.pipeline) if chosen else None
        rows.append({"seed": seed, "asked": len(res.candidates), "evaluated": res.evaluations,
                     "chosen": chosen.pipeline if chosen else None,
                     "chosen_ratio_grid": same.latency_ratio if same else None})
    # Side by side: grid best vs each distinct chosen pipeline, one interleaved run.
    ev = Evaluator(EvalSpec(_bytes(path), arrays, settings,
                            calibration=str(calib)))
    pipes = sorted({r["chosen"] for r in rows if r["chosen"]} | {grid_best.pipeline})
    sessions = {"original": make_session(ev.model_bytes, optimize="all", threads=1)}
    for i, p in enumerate(pipes):
        sessions[p] = make_session(ev.build(p), optimize="all", threads=1)
    res = bench_interleaved(sessions, ev.bench_feeds(), rounds=40, per_round=5, warmup=5)
    o = np.median(np.asarray(res["original"].times_ms).reshape(40, 5), axis=1)
    final = {p: float(np.median(np.median(np.asarray(res[p].times_ms).reshape(40, 5), axis=1) / o)) for p in pipes}
    return {"model": model_name, "grid": size, "budget": budget, "grid_s": grid_s, "metric": metric,
            "max_drop": max_drop, "grid_best": grid_best.pipeline, "grid_best_ratio": grid_best.latency_ratio,
            "grid_best_drop": grid_best.drop, "rows": rows, "final": final, "base": space.base}


# --------------------------------------------------------------------------- trained-model suite

_SUITE_CASE = {}


def suite_metric(outputs, data, original) -> float:
    """The suite case's task metric in points on per-sample dicts split from the evaluator's batched
    outputs: against the truth where the case knows it and the eval data carries the samples'
    ``index`` (accuracy of the strings / rotations, F1 of the characters' boxes), else its agreement
    with the fp32 model's results (100 = the same)."""
    import os

    # The tuner imports this module by name (``bench_tune``), apart from the running script: its cache
    # follows the suite model the script is on (``--suite det ocr`` tunes both in one process)
    name = os.environ.get("BENCH_TUNE_SUITE_CASE")
    if name and _SUITE_CASE.get("name", name) != name:
        _SUITE_CASE.clear()
    if "case" not in _SUITE_CASE:
        from onnxforge.testing.real_suite import load_case

        _SUITE_CASE["case"] = load_case(name)
        _SUITE_CASE["name"] = name
    case = _SUITE_CASE["case"]
    n = len(next(iter(data.values())))
    axes = _batch_axes(case)

    def split(d):
        # tune gives samples on axis 0; the case decodes the model's own layout (the recognizer's
        # logits are (T, N, C)), so each sample goes back to its output's batch axis
        return [{k: np.moveaxis(v[i:i + 1], 0, axes.get(k, 0)) for k, v in d.items()} for i in range(n)]

    if "index" in data:
        labels = _labels(case)
        return 100.0 * float(case.accuracy(split(outputs), [labels[int(i)] for i in np.asarray(data["index"])]))
    return 100.0 * float(case.metric(split(original), split(outputs)))


def _labels(case) -> list:
    # the eval split's labels, as many as the run drew (bench_tune sets it; a worker process computes it)
    if "labels" not in _SUITE_CASE:
        import os

        _SUITE_CASE["labels"] = case.eval_labels(int(os.environ["BENCH_TUNE_SUITE_N"]))
    return _SUITE_CASE["labels"]


def _batch_axes(case) -> dict[str, int]:
    if "axes" not in _SUITE_CASE:
        from onnxforge.runtime.batch import batch_axes

        _SUITE_CASE["axes"] = batch_axes(case.model_path.read_bytes(), case.eval_feeds(1)[0])
    return _SUITE_CASE["axes"]


def run_suite(name: str, n: int, budget: int, seed: int = 0, space: str | None = None, n_calib: int = 16,
              truth: bool = True) -> dict:
    from onnxforge.runtime.bench import bench_interleaved
    from onnxforge.runtime.session import make_session
    from onnxforge.testing.real_suite import load_case
    from onnxforge.tune.evaluate import EvalSettings
    from onnxforge.tune.runner import tune

    import os

    case = load_case(name)
    _SUITE_CASE.clear()  # labels and output axes of the model tuned before
    _SUITE_CASE.update(case=case, name=name)
    os.environ["BENCH_TUNE_SUITE_CASE"] = name
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"bench_tune_{name}_"))
    calib = case.calibration_feeds(n_calib)  # distill (--space) wants hundreds
    np.savez(tmp / "calib.npz", **{k: np.concatenate([f[k] for f in calib]) for k in calib[0]})
    feeds = case.eval_feeds(2 * n)
    seen, unseen = feeds[:n], feeds[n:]
    arrays = {k: np.concatenate([f[k] for f in seen]) for k in seen[0]}
    labels = case.eval_labels(2 * n) if truth else None
    if labels is not None:  # the metric scores against the truth: it finds each sample's label by index
        arrays["index"] = np.arange(n)
        os.environ["BENCH_TUNE_SUITE_N"] = str(2 * n)
        _SUITE_CASE["labels"] = labels
    settings = EvalSettings(metric="bench_tune:suite_metric", max_drop=1.0, batch_size=1, eval_batch=8,
                            quick_samples=max(8, n // 2), latency="cpu")
    t0 = time.perf_counter()
    outcome = tune(case.model_path, eval_data=arrays, calibration_data=tmp / "calib.npz", settings=settings,
                   budget=budget, seed=seed, space=space, cache_dir=REPO / ".onnxforge-cache" / "tune-suite",
                   output=tmp / "tuned.onnx", out_dir=tmp)
    seconds = time.perf_counter() - t0
    chosen = outcome.result.chosen
    row = {"model": name, "budget": budget, "seconds": seconds, "n": n,
           "chosen": chosen.pipeline if chosen else None, "search_ratio": chosen.latency_ratio if chosen else None,
           "search_drop": chosen.drop if chosen else None, "base": outcome.base, "reproduced": outcome.reproduced,
           "front": [(c.pipeline, c.latency_ratio, c.drop) for c in outcome.result.candidates if c.ok],
           "candidates": [{"pipeline": c.pipeline[len(outcome.base):].lstrip(","), "status": c.status,
                           "ratio": c.latency_ratio, "drop": c.drop, "build_s": round(c.build_s, 1),
                           "eval_s": round(c.eval_s, 1), "cached": c.cached}
                          for c in outcome.result.candidates]}
    if chosen is None or outcome.output is None:
        return row
    record = outcome.output.with_name(outcome.output.stem + ".quantize-decisions.json")
    if record.exists():  # a mixed-precision int8 choice: what the pass measured with tune's metric
        import json

        fb = json.loads(record.read_text()).get("measurements", {}).get("fallback", {})
        row["fallback"] = {k: fb.get(k) for k in ("measure", "budget", "samples", "drop_all_int8", "drop_final",
                                                  "search", "builds")}
        row["fallback"]["kept_float"] = len(fb.get("kept_float", []))
    orig = make_session(str(case.model_path), optimize="all", threads=1)
    tuned = make_session(str(outcome.output), optimize="all", threads=1)

    def run_all(info):
        names = [o.name for o in info.session.get_outputs()]
        return [dict(zip(names, info.session.run(None, f))) for f in unseen]

    orig_out, tuned_out = run_all(orig), run_all(tuned)
    row["unseen_metric"] = 100.0 * float(case.metric(orig_out, tuned_out))
    if labels is not None:  # on the unseen half, against the truth: the tuned model's change vs the original's
        row["truth_name"] = case.truth_name
        row["unseen_truth_original"] = 100.0 * case.accuracy(orig_out, labels[n:])
        from bench_real import truth_change  # the paired 95 % interval bench_real reports

        d, lo, hi = truth_change(case, labels[n:], orig_out, tuned_out)
        row["unseen_truth_change"], row["unseen_truth_change_ci"] = 100.0 * d, (100.0 * lo, 100.0 * hi)
    res = bench_interleaved({"original": orig, "tuned": tuned}, unseen[0], rounds=20, per_round=3, warmup=3)
    row["ratio_p50"] = res["tuned"].p50_ms / res["original"].p50_ms
    from onnxforge.passes.prune.latency import timed

    cpu = timed({"original": str(case.model_path), "tuned": str(outcome.output)}, unseen[0], rounds=20)
    row["ratio_cpu"] = cpu["tuned"] / cpu["original"]
    return row


def _bytes(path: pathlib.Path) -> bytes:
    from onnxforge.ir.io import load, model_to_bytes

    return model_to_bytes(load(path))


def main() -> None:
    import os
    import platform
    import subprocess

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["digits", "mobilenetv2_style"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per candidate")
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--suite", nargs="+", default=None, help="trained-model suite names: tune with the default space")
    ap.add_argument("--budget", type=int, default=12)
    ap.add_argument("--n", type=int, default=32, help="--suite: samples tuned on (as many more judge the result)")
    ap.add_argument("--space", default=None, help="--suite: a space file instead of the default space "
                    "(e.g. README's prune -> reconstruct -> distill -> int8 space)")
    ap.add_argument("--n-calib", type=int, default=16, help="--suite: calibration inputs (distill: hundreds)")
    ap.add_argument("--agreement", action="store_true", help="--suite: tune's metric is the agreement with the "
                    "fp32 model even where the case knows the truth (ocr, det, orientation)")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    if args.suite:
        import json

        print(f"# {cpu}, {os.cpu_count()} cores (shared), {platform.python_version()}; batch 1, threads 1")
        for name in args.suite:
            r = run_suite(name, args.n, args.budget, space=args.space, n_calib=args.n_calib, truth=not args.agreement)
            print(json.dumps(r), flush=True)
            short = (r["chosen"] or "-")[len(r["base"]):].lstrip(",") or "(base only)"
            print(f"| {name} | {short} | search {r['search_ratio']} drop {r['search_drop']} | unseen metric "
                  f"{r.get('unseen_metric')}; {r.get('truth_name', 'truth')} change {r.get('unseen_truth_change')} {r.get('unseen_truth_change_ci')} | wall p50 ratio {r.get('ratio_p50')} | CPU-time ratio {r.get('ratio_cpu')} | "
                  f"{r['seconds']:.0f} s |", flush=True)
        return
    print(f"# {cpu}, {os.cpu_count()} cores, {platform.python_version()}; batch {args.batch}, threads 1, "
          f"{args.rounds}x{args.per_round} interleaved runs per candidate")
    for name in args.models:
        r = run(name, args.seeds, args.batch, args.fraction, args.rounds, args.per_round)
        short = lambda p: (p[len(r["base"]):].lstrip(",") or "(base only)") if p else "-"  # noqa: E731
        print(f"\n## {name}: grid {r['grid']} candidates ({r['grid_s']:.0f} s), search budget {r['budget']}, "
              f"{r['metric']} max drop {r['max_drop']}")
        print(f"grid best: {short(r['grid_best'])}  ratio {r['grid_best_ratio']:.3f}  drop {r['grid_best_drop']:.3g}"
              f"  (side by side: {r['final'][r['grid_best']]:.3f})")
        print("| seed | candidates asked | chosen | ratio (grid's measurement) | side-by-side ratio | chosen / grid best |")
        print("|---|---|---|---|---|---|")
        for row in r["rows"]:
            fin = r["final"].get(row["chosen"])
            rel = fin / r["final"][r["grid_best"]] if fin else float("nan")
            cr = row["chosen_ratio_grid"]
            print(f"| {row['seed']} | {row['asked']} | {short(row['chosen'])} | "
                  f"{'-' if cr is None else f'{cr:.3f}'} | {fin:.3f} | {rel:.3f} |")


if __name__ == "__main__":
    main()
