"""Runtime benchmark: throughput vs batch size and threads, data-parallel scaling, fp16 on CPU.

Three measurements, all on onnxruntime's CPU provider (this onnxruntime build has no CUDA or
TensorRT provider, so no GPU figure is measured here):

1. **Batch x threads sweep** (``onnxforge.runtime.tune.tune``) for each bench model: batch sizes
   interleaved round by round inside one session per thread count; p50 latency and throughput
   (samples/s = batch / p50). Sessions at ``ORT_ENABLE_ALL``.
2. **Data-parallel scaling** (``onnxforge.runtime.parallel.run_parallel``) on a dataset of random
   samples: 1 worker x 1 thread, 1 worker x 2 threads, 2 workers x 1 thread. Throughput uses the
   compute time (all workers' sessions ready, barrier, until the last output); wall time includes
   spawning the worker processes and importing onnxforge + onnxruntime in them. The three
   configurations alternate over ``--trials`` trials; medians reported.
3. **convert-fp16 on CPU**: p50 of the float32 model vs its ``convert-fp16`` version (interleaved,
   ``bench_interleaved``) and the max relative output error. CPU has few float16 kernels, so this
   shows the cost of the Casts onnxruntime inserts, not a GPU speed-up.

    .venv/bin/python bench/bench_runtime.py [--models digits_cnn,mobilenetv3_style] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx_ir as ir

from onnxforge.passes.fp16 import ConvertFloat16Pass
from onnxforge.runtime.bench import bench_interleaved
from onnxforge.runtime.parallel import run_parallel
from onnxforge.runtime.tune import tune
from onnxforge.testing import numerics, zoo

DEFAULT_MODELS = ("digits_cnn", "mobilenetv3_style", "yolo_style", "bert_encoder")
BATCHES = {"digits_cnn": (1, 4, 16, 64), "bert_encoder": (1, 2, 4, 8, 16)}
SEQ = 128  # bert_encoder sequence length (its symbolic dim "seq")
DIMS = {"bert_encoder": {"seq": SEQ}}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        name = platform.processor()
    import onnxruntime as ort

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{name}, {os.cpu_count()} cores, onnxruntime {ort.__version__} "
            f"({', '.join(ort.get_available_providers())}), load average at start {load:.1f}")


def sweep(name: str, path: str, quick: bool) -> dict:
    sizes = BATCHES.get(name, (1, 2, 4, 8, 16))
    if quick:
        sizes = sizes[:3]
    result = tune(path, batch_sizes=sizes, threads=[1, 2], rounds=3 if quick else 6, per_round=3 if quick else 5,
                  warmup=2, dim_values=DIMS.get(name))
    return result.to_dict()


def scaling(name: str, path: str, n_samples: int, batch: int, trials: int) -> dict:
    spec = zoo.MODELS[name]
    rng = np.random.default_rng(0)
    if spec.input_dtype == "int64":
        data = {spec.input_names[0]: rng.integers(0, spec.vocab_size, (n_samples, *spec.input_shape)).astype(np.int64)}
    else:
        data = {spec.input_names[0]: rng.standard_normal((n_samples, *spec.input_shape)).astype(np.float32)}
    configs = {"1 worker x 1 thread": (1, 1), "1 worker x 2 threads": (1, 2), "2 workers x 1 thread": (2, 1)}
    runs: dict[str, list] = {label: [] for label in configs}
    reference = None
    for trial in range(trials):
        labels = list(configs)
        labels = labels[trial % len(labels):] + labels[: trial % len(labels)]
        for label in labels:
            workers, threads = configs[label]
            r = run_parallel(path, data, workers=workers, threads_per_worker=threads, batch_size=batch)
            runs[label].append(r)
            out = next(iter(r.outputs.values()))
            if reference is None:
                reference = out
            identical = bool(np.array_equal(out, reference))
            if not identical:
                print(f"  note: {label} outputs differ from the first run (max abs "
                      f"{np.max(np.abs(out - reference)):.3g})", file=sys.stderr)
    base = statistics.median(r.samples_per_s for r in runs["1 worker x 1 thread"])
    rows = {}
    for label, rs in runs.items():
        tput = statistics.median(r.samples_per_s for r in rs)
        rows[label] = {
            "samples_per_s": tput,
            "speedup_vs_1x1": tput / base,
            "compute_s": statistics.median(r.compute_s for r in rs),
            "wall_s": statistics.median(r.wall_s for r in rs),
        }
    return {"model": name, "n_samples": n_samples, "batch_size": batch, "trials": trials, "rows": rows}


def fp16_cost(name: str, model: ir.Model, rounds: int) -> dict:
    half = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    stats = ConvertFloat16Pass()(half).stats
    feeds = zoo.feeds(name, batch=4, seed=1, seq=SEQ if zoo.MODELS[name].is_transformer else None)
    ref, out = numerics.run(model, feeds), numerics.run(half, feeds)
    rel = max(float(np.max(np.abs(r.astype(np.float64) - o)) / max(np.max(np.abs(r)), 1e-12)) for r, o in zip(ref, out))
    res = bench_interleaved({"fp32": model, "fp16": half}, feeds, rounds=rounds, per_round=5, warmup=3)
    bytes32 = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    bytes16 = sum(v.const_value.nbytes for v in half.graph.initializers.values() if v.const_value is not None)
    return {
        "model": name, "max_rel_error": rel, "p50_fp32_ms": res["fp32"].p50_ms, "p50_fp16_ms": res["fp16"].p50_ms,
        "ratio": res["fp16"].p50_ms / res["fp32"].p50_ms, "weight_bytes_fp32": bytes32, "weight_bytes_fp16": bytes16,
        "nodes_fp16": stats.counts["nodes_fp16"], "nodes_kept_fp32": stats.counts["nodes_kept_fp32"],
        "casts": stats.counts["casts_inserted"],
    }


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}.", "", f"Command: `{results['command']}`", ""]
    lines += ["### Throughput vs batch size and threads (CPU, ORT_ENABLE_ALL)", "",
              f"bert_encoder at {SEQ} tokens. Throughput = batch / p50 (what tune-runtime ranks by); "
              "the min columns use the fastest of the timed runs, i.e. the latency when no other process "
              "preempted the run.", "",
              "| model | threads | batch | p50 ms | throughput /s (p50) | vs batch 1 | min ms | throughput /s (min) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, sweep_result in results["sweeps"].items():
        base = {}
        for p in sweep_result["points"]:
            if p["batch_size"] == min(sweep_result["batch_sizes"]):
                base[p["threads"]] = p["throughput_per_s"]
        for p in sweep_result["points"]:
            rec = " **(best)**" if sweep_result["recommended"] and p == sweep_result["recommended"] else ""
            lines.append(f"| {name} | {p['threads']} | {p['batch_size']} | {p['p50_ms']:.3f} | "
                         f"{p['throughput_per_s']:,.0f}{rec} | {p['throughput_per_s'] / base[p['threads']]:.2f}x | "
                         f"{p['min_ms']:.3f} | {p['batch_size'] / p['min_ms'] * 1e3:,.0f} |")
    lines += ["", "### Data-parallel scaling (`onnxforge run --workers N`)", ""]
    for sc in results["scaling"]:
        lines += [f"{sc['model']}: {sc['n_samples']} samples, batch {sc['batch_size']}, median of {sc['trials']} "
                  f"alternating trials.", "",
                  "| configuration | samples/s (compute) | speedup vs 1x1 | compute s | wall s (incl. spawn) |",
                  "|---|---:|---:|---:|---:|"]
        for label, row in sc["rows"].items():
            lines.append(f"| {label} | {row['samples_per_s']:,.0f} | {row['speedup_vs_1x1']:.2f}x | "
                         f"{row['compute_s']:.3f} | {row['wall_s']:.2f} |")
        lines.append("")
    lines += [f"### convert-fp16 on CPU (interleaved, batch 4; bert_encoder {SEQ} tokens)", "",
              "| model | max rel error | weights fp32 -> fp16 | fp16 nodes / kept fp32 / casts | p50 fp32 ms | p50 fp16 ms | ratio |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for f in results["fp16"]:
        lines.append(f"| {f['model']} | {f['max_rel_error']:.2e} | {f['weight_bytes_fp32'] / 1e6:.2f} MB -> "
                     f"{f['weight_bytes_fp16'] / 1e6:.2f} MB | {f['nodes_fp16']} / {f['nodes_kept_fp32']} / {f['casts']} | "
                     f"{f['p50_fp32_ms']:.3f} | {f['p50_fp16_ms']:.3f} | {f['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--scaling-model", default="mobilenetv3_style")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes, rounds and samples")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = [n for n in args.models.split(",") if n]
    results = {"machine": machine(), "command": "python " + " ".join(["bench/bench_runtime.py", *sys.argv[1:]]),
               "sweeps": {}, "scaling": [], "fp16": []}
    with tempfile.TemporaryDirectory() as folder:
        models = {}
        for name in dict.fromkeys([*names, args.scaling_model]):
            models[name] = zoo.export_cached(name)
            ir.save(models[name], os.path.join(folder, f"{name}.onnx"))
        for name in names:
            t0 = time.perf_counter()
            results["sweeps"][name] = sweep(name, os.path.join(folder, f"{name}.onnx"), args.quick)
            print(f"swept {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        samples = 128 if args.quick else args.samples
        results["scaling"].append(
            scaling(args.scaling_model, os.path.join(folder, f"{args.scaling_model}.onnx"), samples, 8,
                    1 if args.quick else args.trials)
        )
        print("scaling done", file=sys.stderr)
        for name in names:
            results["fp16"].append(fp16_cost(name, models[name], 5 if args.quick else 20))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
    sys.stdout.write(markdown(results))


if __name__ == "__main__":
    main()
