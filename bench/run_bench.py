"""Foundation benchmark: onnxforge O1 against onnxruntime's own optimizer and onnxsim, in one run.

For every bench model (built by the harness from the torch zoo, nothing downloaded) it measures, in one
interleaved run so that machine noise hits all variants alike:

  * ``orig/DISABLE``  the exported model, onnxruntime ORT_DISABLE_ALL
  * ``orig/ALL``      the exported model, onnxruntime ORT_ENABLE_ALL         (the baseline for ratios)
  * ``onnxsim/ALL``   onnxsim's simplified model, ORT_ENABLE_ALL
  * ``O1/ALL``        onnxforge preset O1, ORT_ENABLE_ALL

and reports nodes, bytes, p50 latency and the p50 ratio against ``orig/ALL``. Targets (issue 2): O1 node
count <= onnxsim's on every model, O1 latency ratio <= 1.0.

    .venv/bin/python bench/run_bench.py [--models digits_cnn,resnet_style] [--rounds 30] [--markdown]
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

import onnxforge  # noqa: E402
from onnxforge.ir.io import model_to_bytes  # noqa: E402
from onnxforge.ir.summary import quick_stats  # noqa: E402
from onnxforge.runtime.bench import bench_interleaved  # noqa: E402
from onnxforge.runtime.session import make_session  # noqa: E402
from onnxforge.testing import numerics, zoo  # noqa: E402

DEFAULT_MODELS = [
    "digits_cnn",
    "resnet_style",
    "mobilenetv3_style",
    "yolo_style",
    "bert_encoder",
    "opset11_constants",
]


def build_model(name: str):
    """The bench model ``name`` as an onnx_ir.Model (exported fresh; deterministic weights)."""
    if name == "opset11_constants":
        # Opset 11 from the TorchScript exporter, with weights as Constant nodes (PaddlePaddle-style).
        return zoo.constants_as_nodes(zoo.export_opset11("mobilenetv2_style"))
    return zoo.export_model(name)


def run_onnxsim(model_bytes: bytes) -> bytes | None:
    try:
        import onnxsim
    except ImportError:
        return None
    try:
        simplified, ok = onnxsim.simplify(onnx.load_from_string(model_bytes))
    except Exception as e:  # onnxsim fails on some graphs; record that rather than abort
        print(f"  onnxsim failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        return None
    return simplified.SerializeToString() if ok else None


def measure(name: str, rounds: int) -> dict:
    model = build_model(name)
    original = model_to_bytes(model)
    t0 = time.perf_counter()
    ours = onnxforge.optimize(original, "O1")
    ours_seconds = time.perf_counter() - t0
    ours_bytes = model_to_bytes(ours.model)
    t0 = time.perf_counter()
    sim = run_onnxsim(original)
    sim_seconds = time.perf_counter() - t0

    variants = {
        "orig/DISABLE": make_session(original, optimize="disable"),
        "orig/ALL": make_session(original, optimize="all"),
        "O1/ALL": make_session(ours_bytes, optimize="all"),
    }
    if sim is not None:
        variants["onnxsim/ALL"] = make_session(sim, optimize="all")
    feeds = numerics.random_inputs(onnxforge.load(original), dim_values={"batch": 1, "seq": 128}, default_dim=1)
    # Fidelity of ours against the original (ORT_DISABLE_ALL on both sides).
    ref = make_session(original, optimize="disable").session.run(None, feeds)
    got = make_session(ours_bytes, optimize="disable").session.run(None, feeds)
    max_abs = max(float(np.max(np.abs(np.asarray(a, np.float64) - b))) for a, b in zip(ref, got))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = bench_interleaved(variants, feeds, rounds=rounds, per_round=5, warmup=5)
    base = timings["orig/ALL"].p50_ms
    sizes = {"orig/DISABLE": original, "orig/ALL": original, "O1/ALL": ours_bytes}
    if sim is not None:
        sizes["onnxsim/ALL"] = sim
    rows = {}
    for label, result in timings.items():
        stats = quick_stats(onnxforge.load(sizes[label]))
        rows[label] = {
            "nodes": stats["nodes"],
            "bytes": len(sizes[label]),
            "p50_ms": result.p50_ms,
            "ratio": result.p50_ms / base,
        }
    return {"model": name, "rows": rows, "o1_seconds": ours_seconds, "onnxsim_seconds": sim_seconds,
            "o1_max_abs_diff": max_abs}


def machine() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    except OSError:
        model = platform.processor() or "?"
    import onnxruntime

    return f"{model}, {__import__('os').cpu_count()} cores, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}"


def to_markdown(results: list[dict]) -> str:
    out = io.StringIO()
    out.write("| model | variant | nodes | bytes | p50 ms | ratio vs orig/ALL |\n|---|---|---:|---:|---:|---:|\n")
    for r in results:
        for label in ("orig/DISABLE", "orig/ALL", "onnxsim/ALL", "O1/ALL"):
            if label not in r["rows"]:
                out.write(f"| {r['model']} | {label} | (failed) | | | |\n")
                continue
            row = r["rows"][label]
            out.write(f"| {r['model']} | {label} | {row['nodes']} | {row['bytes']:,} | {row['p50_ms']:.3f} | "
                      f"{row['ratio']:.3f} |\n")
    out.write("\n| model | O1 nodes ≤ onnxsim | O1 ratio ≤ 1.0 | O1 max abs diff | O1 time s | onnxsim time s |\n"
              "|---|---|---|---:|---:|---:|\n")
    for r in results:
        rows = r["rows"]
        sim_ok = "n/a" if "onnxsim/ALL" not in rows else (
            "yes" if rows["O1/ALL"]["nodes"] <= rows["onnxsim/ALL"]["nodes"] else "**no**")
        ratio_ok = "yes" if rows["O1/ALL"]["ratio"] <= 1.0 else f"**no** ({rows['O1/ALL']['ratio']:.3f})"
        out.write(f"| {r['model']} | {sim_ok} | {ratio_ok} | {r['o1_max_abs_diff']:.1e} | {r['o1_seconds']:.2f} | "
                  f"{r['onnxsim_seconds']:.2f} |\n")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    results = []
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr)
        results.append(measure(name, args.rounds))
    print(f"machine: {machine()}\n")
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
