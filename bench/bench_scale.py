"""Scale benchmark (issue 14): time and peak memory of ``onnxforge optimize`` on models with external data.

Builds synthetic fp32 MLP stacks whose weights live in one external-data file (written one layer at
a time, so building a model never holds it in memory):

    x[B, D] -> { MatMul(W_i [D, D]) -> Mul(scale_i, a foldable scalar) -> Relu } x L -> y

=========  ======  ======  ================
size (GB)  layers  D       params
=========  ======  ======  ================
1          16      4096    0.27 G (1 GiB)
4          64      4096    1.07 G (4 GiB)
28         104     8192    7.0 G  (a 7B fp32 model, 28 GB)
52         194     8192    13.0 G (a 13B fp32 model, 52 GB)
=========  ======  ======  ================

and runs, each in its own child process (``python -m onnxforge optimize ... --report r.json``), the
pipelines ``O1``, ``O1,quantize-weights-int4``, ``O1,convert-fp16`` and ``O1,quantize-dynamic``. Per
run: wall time, the child's peak RSS (``getrusage`` ``ru_maxrss`` = its ``VmHWM``) and the largest
per-pass peak anonymous memory from the report. Then the O1 output is compared with the original in
onnxruntime (ORT_DISABLE_ALL, a child process per model) on a few random inputs, output by name.

    .venv/bin/python bench/bench_scale.py                    # 1 and 4 GB
    .venv/bin/python bench/bench_scale.py --sizes 1 --pipelines O1 --keep /tmp/scale
    .venv/bin/python bench/bench_scale.py --sizes 28 --pipelines O1,int4
    .venv/bin/python bench/bench_scale.py --sizes 52 --pipelines int4 --scale-every 16 --check-layers

Disk: the model, plus the spill file of ``fold-affine``'s folded weights (one model's bytes when every
layer has a scale; ``--scale-every K`` puts the scale on every K-th layer only), plus the output. Pipelines
that do not fit on the disk, and sizes that lack ~2 GiB + 8 of their largest tensors of free RAM, are
skipped with a message. ``--check-layers`` checks the output layer by layer (see :func:`check_layers`)
where the original is too large for onnxruntime. The machine may be shared: the numbers are single runs
(minutes each), so treat time differences under ~2x as noise; memory is not affected by load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {1: (16, 4096), 4: (64, 4096), 28: (104, 8192), 52: (194, 8192)}
PIPELINES = {
    "O1": "O1",
    "int4": "O1,quantize-weights-int4",
    "fp16": "O1,convert-fp16",
    "dynamic-int8": "O1,quantize-dynamic",
}


def build_mlp(folder: Path, layers: int, dim: int, batch: int = 4, seed: int = 0, scale_every: int = 1) -> Path:
    """Write ``folder/mlp.onnx`` + ``mlp.onnx.data``; one layer's weight in memory at a time.

    Every ``scale_every``-th layer (0: none) has the foldable ``Mul(scale)``; the others are MatMul -> Relu.
    """
    import onnx_ir as ir

    folder.mkdir(parents=True, exist_ok=True)
    data_name = "mlp.onnx.data"
    rng = np.random.default_rng(seed)
    graph = ir.Graph([], [], nodes=[], name="mlp")
    x = ir.Value(name="x", shape=ir.Shape([batch, dim]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(x)
    h = x
    offset = 0
    std = np.float32(np.sqrt(2.0 / dim))
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((dim, dim), dtype=np.float32)
            w *= std
            f.write(w.tobytes())
            tensor = ir.ExternalTensor(data_name, offset, w.nbytes, ir.DataType.FLOAT, shape=ir.Shape([dim, dim]),
                                       name=f"w{i}", base_dir=str(folder))
            offset += w.nbytes
            del w
            wv = ir.Value(name=f"w{i}", shape=ir.Shape([dim, dim]), type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=tensor)
            graph.register_initializer(wv)
            mm = ir.node("MatMul", [h, wv], name=f"mm{i}")
            chain = [(mm, "mm")]
            if scale_every and i % scale_every == 0:
                scale = np.array(rng.uniform(0.9, 1.1), np.float32)
                sv = ir.Value(name=f"s{i}", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                              const_value=ir.tensor(scale, name=f"s{i}"))
                graph.register_initializer(sv)
                chain.append((ir.node("Mul", [mm.outputs[0], sv], name=f"mul{i}"), "mul"))
            relu = ir.node("Relu", [chain[-1][0].outputs[0]], name=f"relu{i}")
            chain.append((relu, "relu"))
            for n, suffix in chain:
                out = n.outputs[0]
                out.name = f"{suffix}{i}_out"
                out.shape, out.type = ir.Shape([batch, dim]), ir.TensorType(ir.DataType.FLOAT)
                graph.append(n)
            h = relu.outputs[0]
    h.name = "y"
    graph.outputs.append(h)
    model = ir.Model(graph, ir_version=10)
    graph.opset_imports[""] = 18
    proto = ir.serde.serialize_model(model)  # external tensors stay references: no data read
    (folder / "mlp.onnx").write_bytes(proto.SerializeToString())
    return folder / "mlp.onnx"


def run_optimize(model: Path, out: Path, pipeline: str, extra: list[str]) -> dict:
    """``onnxforge optimize`` in a child; wall time, child's peak RSS, per-pass memory from the report."""
    report = out.with_suffix(".report.json")
    entry = ["-c", "from onnxforge.cli import main; main()"]
    cmd = [sys.executable, *entry, "optimize", str(model), "-o", str(out), "--passes", pipeline,
           "--report", str(report), "-q", *extra]
    t0 = time.perf_counter()
    err = out.with_suffix(".stderr")
    with open(err, "wb") as stderr_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr_file)
        # The child resets its own VmHWM per pass (runtime.memory.PeakMemory), which also resets
        # getrusage's ru_maxrss: sample its RSS from here instead (every 20 ms).
        peak_rss = peak_anon = 0
        while proc.poll() is None:
            status = _status(proc.pid)
            peak_rss = max(peak_rss, status.get("VmRSS", 0))
            peak_anon = max(peak_anon, status.get("RssAnon", 0))
            time.sleep(0.02)
    seconds = time.perf_counter() - t0
    stderr = err.read_text(errors="replace")
    result = {"pipeline": pipeline, "seconds": seconds, "rc": proc.returncode,
              "peak_rss_sampled": peak_rss, "peak_anon_sampled": peak_anon}
    if proc.returncode != 0:
        result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else "?"
        result["peak_rss"] = peak_rss
        return result
    data = json.loads(report.read_text())
    passes = []
    for r in data["passes"]:
        mem = r.get("memory") or {}
        passes.append((r["name"], r["seconds"], mem.get("peak_rss"), mem.get("peak_anon")))
    result["passes"] = passes
    anon = [p[3] for p in passes if p[3] is not None]
    result["peak_anon_pass"] = max(anon) if anon else None
    # exact per-pass VmHWM (kernel) and the sampled whole-run RSS (load, save, between passes)
    result["peak_rss"] = max([peak_rss] + [p[2] for p in passes if p[2] is not None])
    result["out_bytes"] = sum(p.stat().st_size for p in out.parent.iterdir() if p.name.startswith(out.name))
    return result


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


_COMPARE = r"""
import sys, json, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
so.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
names = [o.name for o in s.get_outputs()]
outs = {n: [] for n in names}
for i in range(x.shape[0]):
    for n, v in zip(names, s.run(None, {"x": x[i]})):
        outs[n].append(v)
np.savez(sys.argv[3], **{n: np.stack(v) for n, v in outs.items()})
"""


def outputs_of(model: Path, inputs: Path, out: Path) -> dict[str, np.ndarray]:
    subprocess.run([sys.executable, "-c", _COMPARE, str(model), str(inputs), str(out)], check=True)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def compare(original: Path, optimized: Path, work: Path, dim: int, samples: int = 3) -> dict:
    rng = np.random.default_rng(1)
    inputs = work / "inputs.npy"
    np.save(inputs, rng.standard_normal((samples, 4, dim), dtype=np.float32))
    ref = outputs_of(original, inputs, work / "ref.npz")
    cand = outputs_of(optimized, inputs, work / "cand.npz")
    worst = 0.0
    for name, r in ref.items():  # by name: a dropped or renamed output fails here
        if name not in cand:
            return {"ok": False, "detail": f"output {name!r} missing"}
        worst = max(worst, float(np.max(np.abs(r - cand[name])) / max(float(np.max(np.abs(r))), 1e-30)))
    return {"ok": worst <= 1e-4, "max_rel": worst}


_PROBE = r"""
import sys, numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
src, dst, inputs, out, layers, dim = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
m = onnx.load(src, load_external_data=False)  # the weights stay in their files (same folder)
have = {o.name for o in m.graph.output}
for i in range(layers - 1):
    if f"relu{i}_out" not in have:
        m.graph.output.append(helper.make_tensor_value_info(f"relu{i}_out", TensorProto.FLOAT, None))
onnx.save(m, dst)
so = ort.SessionOptions(); so.intra_op_num_threads = 2
s = ort.InferenceSession(dst, so, providers=["CPUExecutionProvider"])
x = np.load(inputs)
names = [o.name for o in s.get_outputs()]
got = s.run(None, {"x": x})
np.savez(out, **dict(zip(names, got)))
"""


def check_layers(original: Path, optimized: Path, work: Path, layers: int, dim: int, batch: int = 4) -> dict:
    """Layer-by-layer check for models whose original does not fit in onnxruntime.

    The optimized model runs in onnxruntime (a child) with every layer's output exposed; the reference
    of layer i is computed here in numpy, ``relu((h_{i-1} @ W_i) * s_i)``, from the optimized model's own
    ``h_{i-1}`` and the original's ``W_i`` read from its memory-mapped data file (one layer at a time).
    Reports the largest and median relative L2 error of one layer, and the end-to-end relative error
    against the float reference chained through all layers.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(original, load_external_data=False)
    scales = {t.name: float(numpy_helper.to_array(t)) for t in proto.graph.initializer if t.name.startswith("s")}
    weights = np.memmap(original.parent / "mlp.onnx.data", dtype=np.float32, mode="r", shape=(layers, dim, dim))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((batch, dim), dtype=np.float32)
    np.save(work / "probe_x.npy", x)
    subprocess.run([sys.executable, "-c", _PROBE, str(optimized), str(work / "probe.onnx"), str(work / "probe_x.npy"),
                    str(work / "probe.npz"), str(layers), str(dim)], check=True, cwd=ROOT)
    errs = []
    with np.load(work / "probe.npz") as z:
        got = {k: z[k] for k in z.files}
    h_prev, h_ref = x.astype(np.float64), x.astype(np.float64)
    for i in range(layers):
        w = np.asarray(weights[i], dtype=np.float64)
        s = scales.get(f"s{i}", 1.0)
        ref_local = np.maximum((h_prev @ w) * s, 0.0)
        h_ref = np.maximum((h_ref @ w) * s, 0.0)
        out = got["y" if i == layers - 1 else f"relu{i}_out"].astype(np.float64)
        errs.append(float(np.linalg.norm(out - ref_local) / max(np.linalg.norm(ref_local), 1e-30)))
        h_prev = out
    end = float(np.linalg.norm(h_prev - h_ref) / max(np.linalg.norm(h_ref), 1e-30))
    return {"layers": layers, "max_layer_rel": max(errs), "median_layer_rel": float(np.median(errs)),
            "end_to_end_rel": end}


#: Disk the disk check reserves beyond the model and the folded weights, as a fraction of the model's
#: bytes: a new weight is written twice (the spill file while the pipeline runs, then the output).
OUT_FRACTION = {"O1": 1.0, "int4": 2 * 0.16, "fp16": 2 * 0.5, "dynamic-int8": 2 * 0.26}


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4", help="comma-separated, from 1,4,28,52 (GB)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help=f"from {','.join(PIPELINES)}")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--extra", default="", help="extra arguments for optimize, e.g. '--no-spill'")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--scale-every", type=int, default=1,
                    help="a foldable Mul(scale) on every K-th layer (0: none); fold-affine's new weights go "
                         "to a spill file beside the output, so K=1 needs another model's bytes of disk")
    ap.add_argument("--check-layers", action="store_true",
                    help="check the outputs layer by layer (for sizes whose original does not fit in onnxruntime)")
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes.split(",") if s]
    work_root = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale_", dir=ROOT / "bench"))
    work_root.mkdir(parents=True, exist_ok=True)
    cpu = _cpu()
    print(f"CPU: {cpu}; {os.cpu_count()} cores; RAM {_ram() / 2**30:.0f} GiB (shared machine)")
    results = []
    try:
        for size in sizes:
            layers, dim = SIZES[size]
            model_bytes = layers * dim * dim * 4
            free = shutil.disk_usage(work_root).free
            folded = model_bytes * (1 / args.scale_every if args.scale_every else 0)  # the spill file
            keys = args.pipelines.split(",")
            fits = [k for k in keys if free >= model_bytes + folded + OUT_FRACTION[k] * model_bytes + 2e9]
            for k in keys:
                if k not in fits:
                    need = model_bytes + folded + OUT_FRACTION[k] * model_bytes + 2e9
                    print(f"skip {size} GB {k}: needs {need / 1e9:.0f} GB of disk (model, spilled folded weights, "
                          f"output, 2 GB), {free / 1e9:.0f} GB free")
            if not fits:
                continue
            available = _mem_available()
            need = 2 * 2**30 + 8 * dim * dim * 4  # streaming: a few of the largest tensors, + headroom
            if available is not None and available < need:
                print(f"skip {size} GB: needs ~{need / 2**30:.1f} GiB of free RAM, {available / 2**30:.1f} GiB available")
                continue
            folder = work_root / f"mlp_{size}gb"
            t0 = time.perf_counter()
            model = build_mlp(folder, layers, dim, scale_every=args.scale_every)
            print(f"built {model} ({layers} x {dim}x{dim}, {model_bytes / 2**30:.2f} GiB) "
                  f"in {time.perf_counter() - t0:.0f} s")
            for key in fits:
                out_dir = folder / f"out_{key}"
                shutil.rmtree(out_dir, ignore_errors=True)
                out_dir.mkdir()
                out = out_dir / "model.onnx"
                r = run_optimize(model, out, PIPELINES[key], args.extra.split())
                r.update(size_gb=size, model_bytes=model_bytes, key=key,
                         scale_every=args.scale_every,
                         rss_ratio=r["peak_rss"] / model_bytes)
                if r["rc"] == 0 and key == "O1" and size <= 4:
                    r["compare"] = compare(model, out, out_dir, dim)
                if r["rc"] == 0 and args.check_layers:
                    r["layers_check"] = check_layers(model, out, out_dir, layers, dim)
                results.append(r)
                print(f"  {key:13s} {r['seconds']:7.1f} s  peak RSS {_gb(r['peak_rss'])} GB "
                      f"({r['rss_ratio']:.2f}x model)  peak anon/pass {_gb(r.get('peak_anon_pass'))} GB  "
                      f"{r.get('compare', '')} {r.get('layers_check', '')} {r.get('error', '')}", flush=True)
                if r["rc"] == 0:
                    worst = max(r["passes"], key=lambda p: p[2] or 0)
                    print(f"                highest pass: {worst[0]} peak RSS {_gb(worst[2])} GB")
                shutil.rmtree(out_dir, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "results": results}, indent=2))
    print("\n| model | pipeline | time (s) | peak RSS (GB) | × model bytes | peak anon (GB) "
          "| highest pass | O1 vs original |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cmp = r.get("compare")
        cmp_text = "" if not cmp else (f"max rel {cmp['max_rel']:.1e}" if "max_rel" in cmp else cmp["detail"])
        lc = r.get("layers_check")
        if lc:
            cmp_text += ("; " if cmp_text else "") + (f"per layer: max rel L2 {lc['max_layer_rel']:.1e}, median {lc['median_layer_rel']:.1e}; "
                         f"end to end {lc['end_to_end_rel']:.1e}")
        top = max(r.get("passes") or [("-", 0, 0, 0)], key=lambda p: p[2] or 0)[0]
        print(f"| {r['size_gb']} GB MLP | {r['pipeline']} "
              f"| {r['seconds']:.1f} | {_gb(r['peak_rss'])} | {r['rss_ratio']:.2f} | "
              f"{_gb(max(r['peak_anon_sampled'], r.get('peak_anon_pass') or 0))} | {top} | {cmp_text} |")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


if __name__ == "__main__":
    main()
