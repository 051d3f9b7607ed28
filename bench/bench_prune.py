"""Pruning benchmark: prune-channels at ratio 0.25 / 0.5 (+ reconstruct, + int8) vs the unpruned model.

Per model and ratio: FLOPs ratio and parameter ratio (exact counts from the pass), measured p50
latency ratio vs the unpruned model (onnxruntime CPU, ORT_ENABLE_ALL, batch 1 unless ``--batches``;
zoo models from the dynamo exporter unless ``--exporter torchscript``; all variants of a model timed interleaved in one process with :func:`onnxforge.runtime.bench.bench_interleaved`), and
fidelity vs the unpruned model on held-out feeds (mean cosine of the outputs; digits: test accuracy).
``pruned+rec`` runs ``reconstruct`` after pruning (calibration feeds, teacher = unpruned);
``pruned+rec+int8`` then ``quantize-int8`` (when that pass is registered). ``--round-to 8`` adds
``pruned r rt8`` variants (``prune-channels(ratio=r, round_to=8)``: kept channel counts rounded to
multiples of 8). ``--batches 1,16`` times every variant at each batch size (small models at batch 1
measure per-op overhead more than arithmetic, so a larger batch shows what the FLOPs cut buys).

    .venv/bin/python bench/bench_prune.py [--models digits_cnn,resnet_style,...] [--rounds 30]
        [--batches 1,16] [--round-to 8] [--no-int8] [--exporter dynamo|torchscript] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from onnxforge.passes import PassContext, available_passes, create_pass  # noqa: E402
from onnxforge.runtime.bench import bench_interleaved  # noqa: E402
from onnxforge.runtime.data import CalibrationData  # noqa: E402
from onnxforge.testing import numerics  # noqa: E402


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    vals = []
    for x, y in zip(a, b):
        x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        num = (x * y).sum(1)
        den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12
        vals.append(float(np.mean(num / den)))
    return float(np.mean(vals))


def _load(name: str, dynamo: bool = True):
    from onnxforge.testing import zoo

    if name == "digits_cnn":
        from onnxforge.testing import digits

        model = ir.serde.deserialize_model(onnx.load("examples/digits_cnn.onnx"))
        x_train, _, x_test, y_test = digits.load_digits_split()
        inp = model.graph.inputs[0].name
        calib = [{inp: x_train[i : i + 64]} for i in range(0, 1024, 64)]
        held = [{inp: x_test[i : i + 60]} for i in range(0, 360, 60)]
        metric = lambda m: digits.accuracy(m, x_test, y_test)  # noqa: E731
        return model, calib, held, metric
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo by default: TorchScript writes YOLO's C2f ``chunk`` as Slices bounded by Shape
        # arithmetic, which leaves 5 of its channel groups unprunable (--exporter torchscript shows it)
        model = zoo.export_model(name, opset=18 if dynamo else 17, dynamo=dynamo)
    calib = [zoo.feeds(name, batch=8, seed=100 + i) for i in range(8)]
    held = [zoo.feeds(name, batch=8, seed=200 + i) for i in range(4)]
    return model, calib, held, None


def run(
    models: list[str],
    ratios: list[float],
    rounds: int,
    batches: tuple[int, ...] = (1,),
    round_to: int | None = None,
    int8: bool = True,
    dynamo: bool = True,
    threads: int | None = None,
) -> list[dict]:
    rows = []
    have_int8 = int8 and "quantize-int8" in available_passes()
    for name in models:
        base, calib, held, metric = _load(name, dynamo)
        ref_out = [numerics.run(base, f) for f in held]
        variants: dict[str, ir.Model] = {"unpruned": base}
        info: dict[str, dict] = {"unpruned": {"flops": 1.0, "params": 1.0}}
        for ratio in ratios:
            ctx = PassContext(calibration_data=CalibrationData.from_iterable(calib), reference_model=base)
            pruned = _copy(base)
            stats = create_pass("prune-channels", {"ratio": ratio}, ctx)(pruned).stats
            d = stats.details
            ratios_ = {"flops": d["flops_after"] / d["flops_before"], "params": d["params_after"] / d["params_before"]}
            variants[f"pruned {ratio}"] = pruned
            info[f"pruned {ratio}"] = dict(ratios_)
            rec = _copy(pruned)
            create_pass("reconstruct", {}, ctx)(rec)
            variants[f"pruned {ratio}+rec"] = rec
            info[f"pruned {ratio}+rec"] = dict(ratios_)
            if have_int8:
                q = _copy(rec)
                try:
                    create_pass("quantize-int8", {}, ctx)(q)
                    variants[f"pruned {ratio}+rec+int8"] = q
                    info[f"pruned {ratio}+rec+int8"] = dict(ratios_)
                except Exception as e:  # report, don't hide
                    print(f"{name}: quantize-int8 failed after pruning: {e}", file=sys.stderr)
            if round_to:
                label = f"pruned {ratio} rt{round_to}"
                rounded = _copy(base)
                stats = create_pass("prune-channels", {"ratio": ratio, "round_to": round_to}, ctx)(rounded).stats
                d = stats.details
                variants[label] = rounded
                info[label] = {"flops": d["flops_after"] / d["flops_before"], "params": d["params_after"] / d["params_before"]}
        fidelity = {}
        for label, model in variants.items():
            out = [numerics.run(model, f) for f in held]
            fidelity[label] = {"cosine": _cosine([o[0] for o in ref_out], [o[0] for o in out])}
            if metric is not None:
                fidelity[label]["accuracy"] = metric(model)
        for batch in batches:
            feeds = {k: _batch_of(v, batch) for k, v in held[0].items()}
            results = bench_interleaved(variants, feeds, rounds=rounds, per_round=5, warmup=5, optimize="all",
                                        threads=threads)
            base_ms = results["unpruned"].p50_ms
            for label in variants:
                row = {
                    "model": name, "variant": label, "batch": batch, **info[label],
                    "p50_ms": results[label].p50_ms, "latency_ratio": results[label].p50_ms / base_ms,
                    **fidelity[label],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` rows of ``x``, repeating its rows when it has fewer."""
    reps = -(-batch // len(x))
    return np.concatenate([x] * reps)[:batch]


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | batch | FLOPs | params | p50 ms | latency ratio | speedup / FLOPs reduction | cosine | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup, reduction = 1 / r["latency_ratio"], 1 / r["flops"]
        eff = "" if r["variant"] == "unpruned" else f"{speedup / reduction:.2f}"
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['flops']:.3f} | {r['params']:.3f} | {r['p50_ms']:.3f} | "
                     f"{r['latency_ratio']:.3f} | {eff} | {r['cosine']:.4f} | {acc} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits_cnn,resnet_style,mobilenetv2_style,yolo_style,bert_encoder")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batches", default="1", help="comma-separated batch sizes to time")
    ap.add_argument("--round-to", type=int, default=None, help="add prune-channels(round_to=N) variants")
    ap.add_argument("--no-int8", action="store_true", help="skip the +int8 variants")
    ap.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo", help="zoo models' torch exporter")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    rows = run(
        args.models.split(","),
        [float(r) for r in args.ratios.split(",")],
        args.rounds,
        batches=tuple(int(b) for b in args.batches.split(",")),
        round_to=args.round_to,
        int8=not args.no_int8,
        dynamo=args.exporter == "dynamo",
        threads=args.threads,
    )
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {cpu}; {os.cpu_count()} cores; {platform.python_version()}\n")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
