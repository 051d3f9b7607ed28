"""`make demo`: optimize the bundled digits CNN and show what each build cost and gained.

The model (examples/digits_cnn.onnx) is a small Conv+BatchNorm+ReLU CNN with a residual Add, trained
on scikit-learn's bundled digits data by examples/make_demo_model.py. This script runs:

  * O1 (lossless cleanup and folding), verified pass by pass, and writes examples/out/digits_cnn.O1.onnx
  * then, for each lossy pass family that is installed, a build on top of O1 — channel pruning with
    reconstruction, int8 quantization — to show the accuracy-speed trade-off,
  * and ``onnxforge tune`` (top-1 within 1 point, on the first half of the test digits), whose chosen
    model is the last row,

and prints one table: nodes, parameters, bytes, latency median (interleaved with the original in the
same run), max abs output difference vs the original, and accuracy on the *second* half of the test
digits (which the tuner did not see). A row slower than the original says why.

Pruning: "prune 30 %" cuts 16/32/64 channels to 12/23/45, widths onnxruntime's blocked (NCHWc) Conv
kernels do not take (they want multiples of 16 floats on AVX-512, 8 on AVX2), so every Conv gets
layout reorders around it and the smaller model runs *slower* (1.6x on the project's AVX-512 Xeon).
"prune on latency" measures each group's latency at widths that are multiples of that block and
cuts where the measured time saved per unit of importance lost is largest
(``prune-channels(target_latency=0.8)``; the table is written to examples/out/latency.json and
reused). It runs before O1 so that ``l1`` importance sees BatchNorm unfolded (on this model l1 on
folded filters keeps worse channels: BENCHMARKS.md, Pruning).
"""

from __future__ import annotations

import pathlib
import sys
import warnings

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
MODEL = HERE / "digits_cnn.onnx"
DATA = HERE / "digits_data.npz"
OUT = HERE / "out"


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    import onnxforge
    from onnxforge.ir.io import model_to_bytes
    from onnxforge.ir.summary import quick_stats
    from onnxforge.runtime.bench import bench_interleaved
    from onnxforge.runtime.data import CalibrationData
    from onnxforge.runtime.session import make_session

    # Wide enough for the tables when output goes to a log rather than a terminal.
    console = Console(width=None if sys.stdout.isatty() else 150)
    OUT.mkdir(exist_ok=True)
    original = onnxforge.load(MODEL)
    input_name = original.graph.inputs[0].name
    data = np.load(DATA)
    x_test, y_test = data["x_test"].astype(np.float32), data["y_test"]
    # The .npz holds calibration samples under the model's input name, and the held-out test set.
    calib = CalibrationData.from_arrays({input_name: data[input_name]}, original, batch_size=64)

    # Held-out digits: the tuner scores candidates on the first half, the table on the second.
    half = len(y_test) // 2
    x_tune, y_tune, x_test, y_test = x_test[:half], y_test[:half], x_test[half:], y_test[half:]

    builds: dict[str, str] = {"O1 (lossless)": "O1"}
    reasons: dict[str, str] = {
        "O1 (lossless)": "the same graph onnxruntime's own optimizer makes at load; the difference is noise",
    }
    available = onnxforge.available_passes()
    table_path = OUT / "latency.json"
    if {"prune-channels", "reconstruct"} <= available.keys():
        builds["O1 + prune 30% + reconstruct"] = "O1,prune-channels(ratio=0.3,criterion=l1),reconstruct"
        reasons["O1 + prune 30% + reconstruct"] = (
            "odd widths 12/23/45 leave onnxruntime's NCHWc Conv kernels (blocks of 16 on AVX-512, 8 on AVX2)")
        latency_prune = f"prune-channels(target_latency=0.8,latency_table={table_path}),reconstruct"
        builds["prune on latency (0.8) + reconstruct + O1"] = f"{latency_prune},O1"
        if "quantize-int8" in available:
            builds["prune on latency + reconstruct + O1 + int8"] = f"{latency_prune},O1,quantize-int8"
    if "quantize-int8" in available:
        builds["O1 + int8 (static QDQ)"] = "O1,quantize-int8"
        reasons["O1 + int8 (static QDQ)"] = "a 40 µs model: quantize/dequantize steps cost about what int8 saves"

    models: dict[str, bytes] = {"original": model_to_bytes(original)}
    for label, pipeline in builds.items():
        console.print(f"[bold]building[/bold] {label}: {pipeline}")
        lossless = pipeline == "O1"
        result = onnxforge.optimize(
            MODEL,
            pipeline,
            calibration_data=calib,
            verify=lossless,
            output=OUT / f"digits_cnn.{_slug(label)}.onnx",
            report_path=OUT / f"report.{_slug(label)}.json",
        )
        if lossless:
            result.report.render(console)
        models[label] = model_to_bytes(result.model)

    tuned = _tune(MODEL, calib_path=_calibration_npz(input_name, data), x=x_tune, y=y_tune,
                  input_name=input_name, console=console)
    if tuned is not None:
        label = f"tuned: {tuned[0]}"
        models[label] = tuned[1]
        reasons[label] = (f"the tuner measured it at {tuned[2]:.2f}x (thread CPU time, its own runs); on a "
                          "40 µs model int8's quantize/dequantize steps cost about what they save")

    feeds = {input_name: x_test[:1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = bench_interleaved(models, feeds)
    # Thread CPU time (one onnxruntime thread): what the kernels cost, even on a busy machine.
    from onnxforge.passes.prune.latency import timed

    cpu = timed(models, feeds, rounds=20)
    reference = make_session(models["original"], optimize="disable").session.run(None, {input_name: x_test})[0]

    table = Table(title="digits CNN: what each build costs and gains", title_justify="left")
    for col in ("build", "nodes", "params", "bytes", "latency p50", "vs original", "CPU time vs original",
                "max abs diff", "test acc", "why slower"):
        table.add_column(col, justify="left" if col in ("build", "why slower") else "right")
    for label, blob in models.items():
        stats = quick_stats(onnxforge.load(blob))
        outputs = make_session(blob, optimize="disable").session.run(None, {input_name: x_test})[0]
        acc = float(np.mean(outputs.argmax(axis=1) == y_test))
        diff = float(np.max(np.abs(outputs - reference)))
        p50 = timings[label].p50_ms
        table.add_row(
            label,
            f"{stats['nodes']}",
            f"{stats['params']:,}",
            f"{len(blob):,}",
            f"{p50 * 1000:.0f} µs",
            f"{p50 / timings['original'].p50_ms:.2f}×",
            f"{cpu[label] / cpu['original']:.2f}×",
            f"{diff:.1e}",
            f"{acc * 100:.1f} %",
            reasons.get(label, "") if max(p50 / timings["original"].p50_ms, cpu[label] / cpu["original"]) > 1.0 else "",
        )
    console.print(table)
    console.print(f"latency: batch 1, onnxruntime CPU ORT_ENABLE_ALL, medians of interleaved runs (wall clock, "
                  f"default threads; and thread CPU time with one thread); "
                  f"accuracy on {len(y_test)} held-out digits the tuner did not see. Models and reports in {OUT}")
    return 0


def _calibration_npz(input_name: str, data) -> pathlib.Path:
    path = OUT / "calibration.npz"
    np.savez(path, **{input_name: data[input_name]})
    return path


def _tune(model: pathlib.Path, *, calib_path, x, y, input_name: str, console):
    """``onnxforge tune --metric top1 --max-drop 1`` on (x, y); returns (pipeline, model bytes, the
    tuner's latency ratio)."""
    import onnxforge
    from onnxforge.ir.io import model_to_bytes
    from onnxforge.tune.evaluate import EvalSettings
    from onnxforge.tune.runner import tune

    console.print("[bold]tuning[/bold] top-1 within 1 point (budget 12; latency table shared by the candidates)")
    outcome = tune(model, eval_data={input_name: x, "labels": y}, calibration_data=calib_path,
                   output=OUT / "digits_cnn.tuned.onnx", out_dir=OUT / "tune",
                   settings=EvalSettings(metric="top1", max_drop=1.0, latency="cpu"), budget=12, seed=0,
                   cache_dir=OUT / "tune-cache")
    chosen = outcome.result.chosen
    if chosen is None or outcome.output is None:
        console.print("tune chose nothing within 1 point")
        return None
    short = chosen.pipeline.replace(f",latency_table={_table_option(chosen.pipeline)}", "")
    if outcome.base and short.startswith(outcome.base):
        short = "O1 + " + (short[len(outcome.base):].lstrip(",") or "nothing")
    return short, model_to_bytes(onnxforge.load(outcome.output)), chosen.latency_ratio


def _table_option(pipeline: str) -> str:
    start = pipeline.find("latency_table=")
    if start < 0:
        return ""
    rest = pipeline[start + len("latency_table="):]
    return rest[: min(i for i in (rest.find(","), rest.find(")"), len(rest)) if i >= 0)]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


if __name__ == "__main__":
    sys.exit(main())
