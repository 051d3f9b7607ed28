"""`make demo`: optimize the bundled digits CNN and show what each build cost and gained.

The model (examples/digits_cnn.onnx) is a small Conv+BatchNorm+ReLU CNN with a residual Add, trained
on scikit-learn's bundled digits data by examples/make_demo_model.py. This script runs:

  * O1 (lossless cleanup and folding), verified pass by pass, and writes examples/out/digits_cnn.O1.onnx
  * then, for each lossy pass family that is installed, a build on top of O1 — channel pruning with
    reconstruction, int8 quantization — to show the accuracy-speed trade-off,

and prints one table: nodes, parameters, bytes, latency median (interleaved with the original in the
same run), max abs output difference vs the original, and test accuracy on held-out digits.
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

    builds: dict[str, str] = {"O1 (lossless)": "O1"}
    available = onnxforge.available_passes()
    if {"prune-channels", "reconstruct"} <= available.keys():
        builds["O1 + prune 30% + reconstruct"] = "O1,prune-channels(ratio=0.3,criterion=l1),reconstruct"
    if "quantize-int8" in available:
        builds["O1 + int8 (static QDQ)"] = "O1,quantize-int8"

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

    feeds = {input_name: x_test[:1]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = bench_interleaved(models, feeds)
    reference = make_session(models["original"], optimize="disable").session.run(None, {input_name: x_test})[0]

    table = Table(title="digits CNN: what each build costs and gains", title_justify="left")
    for col in ("build", "nodes", "params", "bytes", "latency p50", "vs original", "max abs diff", "test acc"):
        table.add_column(col, justify="left" if col == "build" else "right")
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
            f"{diff:.1e}",
            f"{acc * 100:.1f} %",
        )
    console.print(table)
    console.print(f"latency: batch 1, onnxruntime CPU ORT_ENABLE_ALL, medians of interleaved runs; "
                  f"accuracy on {len(y_test)} held-out digits. Models and reports in {OUT}")
    return 0


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


if __name__ == "__main__":
    sys.exit(main())
