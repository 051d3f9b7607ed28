"""Kernel A/B: onnxruntime's ``com.microsoft.SkipLayerNormalization`` vs ``Add`` (+ bias ``Add``) +
``LayerNormalization`` on the CPU execution provider — the same math, two graphs — and the RMSNorm
pair, ``SkipSimplifiedLayerNormalization`` vs ``Add`` + ``SimplifiedLayerNormalization``.

Why this exists: the ``fuse`` pass (and onnxruntime's own session optimizer, ``SkipLayerNormFusion``)
turns a residual ``Add`` + ``LayerNormalization`` into one ``SkipLayerNormalization``. Whether that
is faster depends on the kernel, so it is measured here rather than assumed. Both graphs run at
``ORT_ENABLE_BASIC`` (so onnxruntime does not rewrite either), interleaved in one process; shapes
[batch, seq, hidden] as in BERT-style encoders; the outputs are compared first.

    .venv/bin/python bench/bench_skiplayernorm.py [--threads 1,2] [--rounds 30] [--norms layernorm,rmsnorm]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def _model(hidden: int, fused: bool, bias: bool, norm: str = "layernorm") -> bytes:
    rng = np.random.default_rng(0)  # the same weights for both graphs
    gamma, beta, b = (rng.standard_normal(hidden).astype(np.float32) for _ in range(3))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", hidden]) for n in ("x", "skip")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [hidden], v) for n, v in (("gamma", gamma), ("beta", beta))]
    if bias:
        inits.append(helper.make_tensor("bias", TensorProto.FLOAT, [hidden], b))
    rms = norm == "rmsnorm"  # RMSNorm has no beta
    if fused:
        ins = ["x", "skip", "gamma"] + ([] if rms else ["beta"]) + (["bias"] if bias else [])
        op = "SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"
        nodes = [helper.make_node(op, ins, ["y"], domain="com.microsoft", epsilon=1e-5)]
    else:
        nodes = [helper.make_node("Add", ["x", "bias"], ["xb"])] if bias else []
        nodes.append(helper.make_node("Add", ["xb" if bias else "x", "skip"], ["sum"]))
        if rms:
            nodes.append(helper.make_node("SimplifiedLayerNormalization", ["sum", "gamma"], ["y"], axis=-1, epsilon=1e-5))
        else:
            nodes.append(helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5))
    graph = helper.make_graph(nodes, "skip_layer_norm", inputs, [output], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def measure(batch: int, seq: int, hidden: int, bias: bool, threads: int, rounds: int, norm: str = "layernorm") -> dict:
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((batch, seq, hidden)).astype(np.float32) for n in ("x", "skip")}
    sessions = {"add+layernorm": _session(_model(hidden, False, bias, norm), threads),
                "skiplayernorm": _session(_model(hidden, True, bias, norm), threads)}
    outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
    np.testing.assert_allclose(outs["skiplayernorm"], outs["add+layernorm"], rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):  # interleaved: both see the same machine state
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(10):
                s.run(None, feeds)
            times[k].append((time.perf_counter() - t0) / 10 * 1e3)
    p50 = {k: float(np.median(v)) for k, v in times.items()}
    return {"norm": norm, "batch": batch, "seq": seq, "hidden": hidden, "bias": bias, "threads": threads,
            "p50_ms": {k: round(v, 4) for k, v in p50.items()},
            "skiplayernorm/add+layernorm": round(p50["skiplayernorm"] / p50["add+layernorm"], 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--norms", default="layernorm,rmsnorm")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(f"onnxruntime {ort.__version__}", flush=True)
    rows = []
    for norm in args.norms.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            for batch, hidden in ((1, 64), (8, 64), (1, 768), (8, 768)):
                for bias in (False, True):
                    row = measure(batch, 128, hidden, bias, threads, args.rounds, norm)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"onnxruntime": ort.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
