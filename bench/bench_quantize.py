"""Quantization benchmark: our quantize-int8 / quantize-dynamic against onnxruntime's quantizer.

For each model, on the same calibration feeds:

* ``ours``        quantize-int8 (defaults: percentile, per-channel, U8S8 on cpu);
* ``ours+guard``  quantize-int8(latency_guard=true);
* ``ours-s8s8``   quantize-int8(activation_type=int8): checks the U8S8 choice by measurement;
* ``ort-minmax``  onnxruntime.quantization.quantize_static, QDQ, per-channel, MinMax (its defaults:
  S8S8), after quant_pre_process;
* ``ort-entropy`` the same with CalibrationMethod.Entropy;
* ``ort-tuned``   hand-tuned: Conv-only, uint8 activations, int8 per-channel weights, MinMax;
* transformers: ``ours-dyn`` quantize-dynamic vs ``ort-dyn`` quantize_dynamic (per-channel).

Latency: p50 ms, all models of one row timed interleaved in one process
(:func:`onnxforge.runtime.bench.bench_interleaved`, ORT_ENABLE_ALL, batch 1). Fidelity vs fp32 on
held-out feeds: mean cosine, top-1 agreement; digits: test accuracy.

    .venv/bin/python bench/bench_quantize.py [--models digits_cnn,mobilenetv3_style,...] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnx_ir as ir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from onnxforge.passes import PassContext, create_pass  # noqa: E402
from onnxforge.passes.quantize.calibrate import run_outputs  # noqa: E402
from onnxforge.passes.quantize.qmath import cosine  # noqa: E402
from onnxforge.runtime.bench import bench_interleaved  # noqa: E402

CNNS = ["digits_cnn", "mobilenetv3_style", "yolo_style", "resnet_style", "resnet_style@opset11"]


def fold_bn_torch(module):
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in module.modules():
        if isinstance(seq, torch.nn.Sequential):
            for i in range(len(seq) - 1):
                if isinstance(seq[i], torch.nn.Conv2d) and isinstance(seq[i + 1], torch.nn.BatchNorm2d):
                    seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                    seq[i + 1] = torch.nn.Identity()
    return module


def load_model(name: str):
    """(fp32 ir.Model with BN folded, calibration feeds, eval feeds, (x_test, y_test) or None)."""
    import torch

    from onnxforge.testing import zoo

    opset11 = name.endswith("@opset11")
    base = name.split("@")[0]
    labels = None
    if base == "digits_cnn":
        from onnxforge.testing import digits as dg

        x_tr, _, x_te, y_te = dg.load_digits_split()
        module = fold_bn_torch(dg.train_digits_cnn(seed=0))
        labels = (x_te, y_te)
        ex = (torch.from_numpy(x_te[:1]),)
    else:
        module = fold_bn_torch(zoo.build(base))
        ex = zoo.example_inputs(base)
    if opset11:
        from onnxforge.torch_export import export

        model = export(module, ex, opset=11, dynamo=False, dynamic_batch=True)
    else:
        model = zoo.export_model(module, ex)
    inp = model.graph.inputs[0].name
    if base == "digits_cnn":
        calib = [{inp: x_tr[i : i + 1]} for i in range(64)]
        evalf = [{inp: x_te[i : i + 1]} for i in range(64)]
    else:
        calib = [{inp: next(iter(zoo.feeds(base, seed=s).values()))} for s in range(16)]
        evalf = [{inp: next(iter(zoo.feeds(base, seed=100 + s).values()))} for s in range(16)]
    return model, calib, evalf, labels


def to_bytes(m) -> bytes:
    if isinstance(m, ir.Model):
        return ir.serde.serialize_model(m).SerializeToString()
    return m.SerializeToString() if isinstance(m, onnx.ModelProto) else m


def ours(model, calib, target="cpu", **opts):
    m = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    t = time.perf_counter()
    r = create_pass("quantize-int8", opts, PassContext(target=target, calibration_data=calib))(m)
    return to_bytes(r.model), time.perf_counter() - t, r.stats


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def ort_static(model_bytes, calib, method="minmax", tuned=False):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d, _cwd(d):  # its shape inference writes temp files to the cwd
        src, pre, dst = (os.path.join(d, f) for f in ("in.onnx", "pre.onnx", "out.onnx"))
        open(src, "wb").write(model_bytes)
        t = time.perf_counter()
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=False)
        except Exception as e:  # its symbolic shape inference fails on some exports
            print(f"    quant_pre_process failed ({type(e).__name__}); quantizing the raw model", flush=True)
            pre = src
        kw = dict(quant_format=QuantFormat.QDQ, per_channel=True,
                  calibrate_method=CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax)
        if tuned:
            kw.update(op_types_to_quantize=["Conv"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        quantize_static(pre, dst, Reader(), **kw)
        out = open(dst, "rb").read()
        return out, time.perf_counter() - t


def ort_dynamic(model_bytes):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d, _cwd(d):
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        open(src, "wb").write(model_bytes)
        t = time.perf_counter()
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)
        return open(dst, "rb").read(), time.perf_counter() - t


def fidelity(fp32, cand, evalf, labels):
    ref = run_outputs(fp32, evalf, optimize=False)
    out = run_outputs(cand, evalf, optimize=True)
    cos = float(np.mean([cosine(r[0], o[0]) for r, o in zip(ref, out)]))
    top1 = float(np.mean([np.mean(r[0].reshape(len(r[0]), -1).argmax(-1) == o[0].reshape(len(o[0]), -1).argmax(-1))
                          for r, o in zip(ref, out)]))
    res = {"cosine": round(cos, 5), "top1_agree": round(top1, 4)}
    if labels is not None:
        from onnxforge.testing import digits as dg

        res["accuracy"] = round(dg.accuracy(cand, labels[0], labels[1]), 4)
    return res


def bench_model(name, rounds):
    print(f"== {name}", flush=True)
    model, calib, evalf, labels = load_model(name)
    fp32 = to_bytes(model)
    kind = "transformer" if "bert" in name else "cnn"
    cands: dict[str, bytes] = {"fp32": fp32}
    info: dict[str, dict] = {"fp32": {}}
    if kind == "cnn":
        for label, fn in [
            ("ours", lambda: ours(model, calib)[:2]),
            ("ours+guard", lambda: ours(model, calib, latency_guard=True)[:2]),
            ("ours-s8s8", lambda: ours(model, calib, activation_type="int8")[:2]),
            ("ort-minmax", lambda: ort_static(fp32, calib, "minmax")),
            ("ort-entropy", lambda: ort_static(fp32, calib, "entropy")),
            ("ort-tuned", lambda: ort_static(fp32, calib, "minmax", tuned=True)),
        ]:
            try:
                b, secs = fn()
                cands[label] = b
                info[label] = {"quantize_s": round(secs, 2)}
            except Exception as e:
                info[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"  {label}: FAILED {info[label]['error']}", flush=True)
    else:
        m = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        t = time.perf_counter()
        cands["ours-dyn"] = to_bytes(create_pass("quantize-dynamic", {}, PassContext())(m).model)
        info["ours-dyn"] = {"quantize_s": round(time.perf_counter() - t, 2)}
        cands["ort-dyn"], secs = ort_dynamic(fp32)
        info["ort-dyn"] = {"quantize_s": round(secs, 2)}
        m = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        cands["ours-int4"] = to_bytes(create_pass("quantize-weights-int4", {}, PassContext())(m).model)
        info["ours-int4"] = {}
    for label, b in cands.items():
        if label != "fp32":
            try:
                info[label].update(fidelity(fp32, b, evalf, labels))
            except Exception as e:
                info[label]["error"] = f"run: {type(e).__name__}: {str(e)[:200]}"
                cands[label] = None
    if labels is not None:
        info["fp32"].update(fidelity(fp32, fp32, evalf, labels))
    runnable = {k: v for k, v in cands.items() if v is not None}
    lat = bench_interleaved(runnable, evalf[0], rounds=rounds, per_round=10, warmup=5, optimize="all")
    base = lat["fp32"].p50_ms
    for label, r in lat.items():
        info[label]["p50_ms"] = round(r.p50_ms, 4)
        info[label]["vs_fp32"] = round(r.p50_ms / base, 3)
    for label in info:
        print(f"  {label:12s} {info[label]}", flush=True)
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(CNNS + ["bert_encoder"]))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.python_version()}", flush=True)
    results = {"machine": cpu, "cores": os.cpu_count()}
    for name in args.models.split(","):
        try:
            results[name] = bench_model(name, args.rounds)
        except Exception as e:
            print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
