"""Fusion benchmark: our ``O2`` (fold + ``fuse``) vs onnxruntime's transformer optimizer vs plain ORT.

For each model (zoo ``bert_encoder`` — hidden 64, 4 heads, FFN 256, 2 layers — from both torch
exporters, at batch 1 and 8 × 128 tokens; the same encoder at BERT-base width — hidden 768, 12 heads,
FFN 3072, 2 layers — unless ``--no-wide``; the ``mobilenetv3_style`` and ``yolo_style`` CNNs at batch
1 and 8), in one process, interleaved
(``onnxforge.runtime.bench.bench_interleaved``), every session at ``ORT_ENABLE_ALL``:

* ``plain``: the exported model as is;
* ``ort-opt``: ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert", opt_level=0)``
  (its own fusions, then ORT_ENABLE_ALL at session creation like the others);
* ``ours``: ``Pipeline("O2", target=cpu)``.

Also: fused op counts of each, ratios of p50 latency, and for CNNs (``resnet_style``,
``mobilenetv3_style``, ``yolo_style``) whether the opt-in ``FusedConv`` / ``FusedConvAdd`` rules
(``ours+fusedconv``) change anything, at ``ORT_ENABLE_ALL`` (they should not: its NCHWc transformer
fuses Conv+activation and Conv+residual Add itself) and at ``ORT_ENABLE_BASIC`` (``--cnn-levels``).

    .venv/bin/python bench/bench_fuse.py [--quick] [--no-wide] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.manager import Pipeline
from onnxforge.runtime.bench import bench_interleaved
from onnxforge.testing import numerics, zoo

FUSED = (
    "Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu",
    "Gelu", "FastGelu", "EmbedLayerNormalization", "FusedConv", "HardSwish", "Gemm",
)  # fmt: skip


def _counts(model: ir.Model) -> dict[str, int]:
    c = collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return {k: c[k] for k in FUSED if c[k]}


def _ours(model: ir.Model, target: str = "cpu") -> ir.Model:
    m = ir.from_proto(ir.to_proto(model))
    return Pipeline("O2", context=PassContext(target=target))(m).model


def _ort_optimizer(model: ir.Model, num_heads: int, hidden: int) -> ir.Model:
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        onnx.save(ir.to_proto(model), path)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            opt = optimize_model(path, model_type="bert", num_heads=num_heads, hidden_size=hidden, opt_level=0)
        return ir.from_proto(opt.model)


def _export_encoder(hidden: int, heads: int, ffn: int, dynamo: bool) -> ir.Model:
    """The zoo encoder at the given width, dynamic batch and sequence axes, random weights."""
    if (hidden, heads, ffn) == (64, 4, 256):
        return zoo.export_model("bert_encoder", dynamo=dynamo)
    from onnxforge.torch_export import export

    module = zoo.build_bert_encoder(hidden=hidden, heads=heads, ffn=ffn)
    return export(
        module, zoo.example_inputs("bert_encoder"), dynamo=dynamo, dynamic_batch=True,
        dynamic_axes={"input_ids": {1: "seq"}}, input_names=["input_ids"],
    )


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
    except Exception:
        name = platform.processor() or "unknown"
    import onnxruntime

    return f"{name}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}"


def _row(label, batch, seq, results, counts):
    base = results["plain"].p50_ms
    ort = results.get("ort-opt")
    line = {
        "model": label,
        "batch": batch,
        "seq": seq,
        "p50_ms": {k: round(r.p50_ms, 3) for k, r in results.items()},
        "ours/plain": round(results["ours"].p50_ms / base, 3),
        "ours/ort-opt": round(results["ours"].p50_ms / ort.p50_ms, 3) if ort else None,
        "ort-opt/plain": round(ort.p50_ms / base, 3) if ort else None,
        "fused_ops": counts,
    }
    print(json.dumps(line), flush=True)
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-wide", action="store_true", help="skip the BERT-base-width encoder")
    ap.add_argument("--only", choices=("encoders", "cnns"), help="run one half (e.g. on two core sets at once)")
    ap.add_argument(
        "--cnn-levels", default="all,basic",
        help="onnxruntime optimization levels for the CNN rows (FusedConv only matters below 'all')",
    )
    args = ap.parse_args(argv)
    rounds, per_round = (4, 3) if args.quick else (20, 5)
    rows = []
    print("machine:", _machine(), flush=True)

    encoders = [] if args.only == "cnns" else [("bert_encoder", 64, 4, 256, rounds, per_round)]
    if not args.no_wide and args.only != "cnns":  # BERT-base width: MatMul-bound, fewer rounds (each run takes 40-250 ms)
        encoders.append(("bert_encoder-768", 768, 12, 3072, max(rounds // 2, 2), max(per_round - 2, 1)))
    for name, hidden, heads, ffn, n_rounds, n_per_round in encoders:
        for dynamo in (True, False):
            label = f"{name} ({'dynamo' if dynamo else 'torchscript'})"
            plain = _export_encoder(hidden, heads, ffn, dynamo)
            ours = _ours(plain)
            variants = {"plain": plain, "ours": ours}
            try:
                variants["ort-opt"] = _ort_optimizer(plain, num_heads=heads, hidden=hidden)
            except Exception as e:  # some onnxruntime versions crash on some exports: say so, go on
                print(f"{label}: onnxruntime's transformer optimizer failed: {type(e).__name__}: {e}", flush=True)
            counts = {k: _counts(m) for k, m in variants.items()}
            for batch in (1, 8):
                feeds = zoo.feeds("bert_encoder", batch=batch, seq=128)
                numerics.assert_outputs_close(plain, ours, feeds)
                if "ort-opt" in variants:
                    numerics.assert_outputs_close(plain, variants["ort-opt"], feeds)
                res = bench_interleaved(
                    variants,
                    feeds, rounds=n_rounds, per_round=n_per_round, threads=args.threads, optimize="all",
                )
                rows.append(_row(label, batch, 128, res, counts))

    for name in () if args.only == "encoders" else ("resnet_style", "mobilenetv3_style", "yolo_style"):
        plain = zoo.export_model(name)
        ours = _ours(plain)
        no_fc = _ours(plain, target="onnx")  # standard ops only
        # the opt-in contrib rules: Conv+activation and Conv+residual Add (+activation) → FusedConv
        with_fc = ir.from_proto(ir.to_proto(ours))
        create_pass("fuse", {"rules": ["FusedConv", "FusedConvAdd"]}, PassContext(target="cpu"))(with_fc)
        variants = {"plain": plain, "ours": ours, "ours-onnx": no_fc, "ours+fusedconv": with_fc}
        counts = {k: _counts(m) for k, m in variants.items()}
        for level in args.cnn_levels.split(","):
            for batch in (1, 8):
                feeds = zoo.feeds(name, batch=batch)
                numerics.assert_outputs_close(plain, with_fc, feeds)
                res = bench_interleaved(
                    variants, feeds, rounds=rounds, per_round=per_round, threads=args.threads, optimize=level,
                )
                row = _row(f"{name} @{level}", batch, None, res, counts)
                row["ours+fusedconv/ours"] = round(res["ours+fusedconv"].p50_ms / res["ours"].p50_ms, 3)
                rows.append(row)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
