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
    .venv/bin/python bench/bench_scale.py --sizes 28,52      # needs the disk (2.3 x size free)

Sizes whose model and output do not fit on the disk, or that lack ~2 GiB + 8 of their largest tensors
of free RAM, are skipped with a message. The machine may be shared: the numbers are single runs
(minutes each), so treat time differences under ~2x as noise; memory is not affected by load.

``--patch-fold`` measures the one-line change proposed for ``onnxforge/passes/fold.py`` (its folded
weights handed to ``onnxforge.ir.io.spill``), applied as a monkeypatch in the child only.
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


def build_mlp(folder: Path, layers: int, dim: int, batch: int = 4, seed: int = 0) -> Path:
    """Write ``folder/mlp.onnx`` + ``mlp.onnx.data``; one layer's weight in memory at a time."""
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
            scale = np.array(rng.uniform(0.9, 1.1), np.float32)
            sv = ir.Value(name=f"s{i}", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=ir.tensor(scale, name=f"s{i}"))
            graph.register_initializer(wv)
            graph.register_initializer(sv)
            mm = ir.node("MatMul", [h, wv], name=f"mm{i}")
            mul = ir.node("Mul", [mm.outputs[0], sv], name=f"mul{i}")
            relu = ir.node("Relu", [mul.outputs[0]], name=f"relu{i}")
            for n, suffix in ((mm, "mm"), (mul, "mul"), (relu, "relu")):
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


# --patch-fold: measure the one-line change proposed for onnxforge/passes/fold.py (its rewrite() builds
# the folded weight with ir.tensor(new_w); wrapping it in onnxforge.ir.io.spill(...) streams it). Applied
# here by monkeypatching the module's `ir` in the child, so the figures can be compared before the
# change is made; fold.py itself is not modified.
_PATCH_FOLD = """
import types, onnx_ir as ir
from onnxforge.ir import io
import onnxforge.passes.fold as fold
proxy = types.SimpleNamespace(**{k: getattr(ir, k) for k in dir(ir) if not k.startswith('__')})
proxy.tensor = lambda *a, **k: io.spill(ir.tensor(*a, **k))
fold.ir = proxy
"""


def run_optimize(model: Path, out: Path, pipeline: str, extra: list[str], patch_fold: bool = False) -> dict:
    """``onnxforge optimize`` in a child; wall time, child's peak RSS, per-pass memory from the report."""
    report = out.with_suffix(".report.json")
    entry = ["-c", (_PATCH_FOLD if patch_fold else "") + "from onnxforge.cli import main; main()"]
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


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4", help="comma-separated, from 1,4,28,52 (GB)")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help=f"from {','.join(PIPELINES)}")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--extra", default="", help="extra arguments for optimize, e.g. '--no-spill'")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--patch-fold", action="store_true",
                    help="measure with the proposed one-line streaming change to fold.py (monkeypatched)")
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
            if free < 2.3 * model_bytes:
                print(f"skip {size} GB: needs {2.3 * model_bytes / 1e9:.0f} GB of disk, {free / 1e9:.0f} GB free")
                continue
            available = _mem_available()
            need = 2 * 2**30 + 8 * dim * dim * 4  # streaming: a few of the largest tensors, + headroom
            if available is not None and available < need:
                print(f"skip {size} GB: needs ~{need / 2**30:.1f} GiB of free RAM, {available / 2**30:.1f} GiB available")
                continue
            folder = work_root / f"mlp_{size}gb"
            t0 = time.perf_counter()
            model = build_mlp(folder, layers, dim)
            print(f"built {model} ({layers} x {dim}x{dim}, {model_bytes / 2**30:.2f} GiB) "
                  f"in {time.perf_counter() - t0:.0f} s")
            for key in args.pipelines.split(","):
                out_dir = folder / f"out_{key}"
                shutil.rmtree(out_dir, ignore_errors=True)
                out_dir.mkdir()
                out = out_dir / "model.onnx"
                r = run_optimize(model, out, PIPELINES[key], args.extra.split(), args.patch_fold)
                r.update(size_gb=size, model_bytes=model_bytes, key=key, patch_fold=args.patch_fold,
                         rss_ratio=r["peak_rss"] / model_bytes)
                if r["rc"] == 0 and key == "O1" and size <= 4:
                    r["compare"] = compare(model, out, out_dir, dim)
                results.append(r)
                print(f"  {key:13s} {r['seconds']:7.1f} s  peak RSS {_gb(r['peak_rss'])} GB "
                      f"({r['rss_ratio']:.2f}x model)  peak anon/pass {_gb(r.get('peak_anon_pass'))} GB  "
                      f"{r.get('compare', '')} {r.get('error', '')}", flush=True)
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
    print("\n| model | pipeline | fold.py | time (s) | peak RSS (GB) | × model bytes | peak anon (GB) "
          "| highest pass | O1 vs original |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cmp = r.get("compare")
        cmp_text = "" if not cmp else (f"max rel {cmp['max_rel']:.1e}" if "max_rel" in cmp else cmp["detail"])
        top = max(r.get("passes") or [("-", 0, 0, 0)], key=lambda p: p[2] or 0)[0]
        print(f"| {r['size_gb']} GB MLP | {r['pipeline']} | {'spill (patched)' if r['patch_fold'] else 'as is'} "
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
