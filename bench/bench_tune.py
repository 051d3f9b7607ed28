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
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
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
