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

``--suite orientation,effnet,...`` instead benchmarks the trained-model suite
(:mod:`onnxforge.testing.real_suite`) at 30 % of the FLOPs removed (``--flops-keep 0.7``), batch 1,
every variant + ``reconstruct`` and scored with the suite's task metric on held-out feeds. Latency:
interleaved runs, one onnxruntime thread, medians of each run's *thread CPU time*
(:func:`onnxforge.passes.prune.latency.timed`; onnxruntime runs the graph on the calling thread
then) next to the ratio of wall-clock medians: on a shared machine whose load average is many times
its core count the wall time is mostly waiting for a core (a model's wall p50 was 9x its thread
time on the project's 2-core box at load 16), so the CPU-time ratio is the figure to read there.

* ``flops`` -- ``prune-channels(target_flops=0.7)``: importance ranking alone;
* ``latency@flops`` -- ``prune-channels(target_latency=1.0, target_flops=0.7)``: the same FLOPs cut
  allocated on measured latency at ISA-block widths (table cached in ``.onnxforge-cache/``);
* ``latency 0.6`` -- ``prune-channels(target_latency=0.6)``; ``+int8`` -- then ``quantize-int8``;
* ``onnxsim`` -- ``onnxsim.pruning.apply_structured_pruning`` with its sparsity bisected to the
  parameter count of ``latency@flops`` (as close as its coverage allows; no reconstruct: its node
  names are its own).

Coverage = share of the Conv/Gemm/MatMul-with-constant-weight layers whose weight a 50 % cut
changes (ours: ``prune-channels(ratio=0.5)``; onnxsim: ``sparsity=0.5``).

``--recover orientation,effnet`` (issue 12): prune 30 % of the FLOPs on measured latency, then
``reconstruct``, ``distill`` (``--n-train`` generated unlabeled inputs, ``--epochs``) and
``quantize-int8``; every stage's top-1 agreement with fp32 on ``--n-eval`` held-out inputs with a
95 % Wilson interval, and its latency ratio (thread CPU time and wall p50, interleaved, ORT_ENABLE_ALL)::

    .venv/bin/python bench/bench_prune.py --recover orientation --n-train 256 --n-eval 200 --epochs 3
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


# --------------------------------------------------------------------------- trained-model suite


def _weighted_shapes(model: ir.Model) -> dict[str, tuple]:
    from onnxforge.ir.graph import const_value

    out = {}
    for n in model.graph:
        if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(n.inputs) > 1:
            w = const_value(n.inputs[1])
            if w is not None and w.ndim >= 2:
                out[n.name] = tuple(w.shape)
    return out


def _coverage(before: ir.Model, after: ir.Model) -> float:
    a, b = _weighted_shapes(before), _weighted_shapes(after)
    return sum(1 for k, v in a.items() if b.get(k, v) != v) / max(1, len(a))


def _onnxsim(model: ir.Model, sparsity: float) -> ir.Model:
    from onnxsim.pruning import apply_structured_pruning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = apply_structured_pruning(ir.serde.serialize_model(model), sparsity=sparsity)
    return ir.serde.deserialize_model(out)


def _params(model: ir.Model) -> int:
    from onnxforge.ir.summary import quick_stats

    return quick_stats(model)["params"]


def _flops(model: ir.Model) -> int:
    from onnxforge.ir.summary import summarize

    return summarize(model).flops


def run_suite(models: list[str], rounds: int, flops_keep: float = 0.7, threads: int | None = 1,
              n_eval: int = 16, int8: bool = True) -> list[dict]:
    from onnxforge.runtime.session import make_session
    from onnxforge.testing.real_suite import load_case

    rows = []
    cache = os.path.join(os.path.dirname(__file__), "..", ".onnxforge-cache")
    os.makedirs(cache, exist_ok=True)
    for name in models:
        case = load_case(name)
        base = ir.serde.deserialize_model(onnx.load(str(case.model_path)))
        calib = CalibrationData.from_iterable(case.calibration_feeds(16))
        held = case.eval_feeds(n_eval)

        def outputs(m: ir.Model) -> list[dict]:
            sess = make_session(m, optimize="all").session
            names = [o.name for o in sess.get_outputs()]
            return [dict(zip(names, sess.run(None, f))) for f in held]

        ref = outputs(base)
        table_path = os.path.abspath(os.path.join(cache, f"latency-{name}.json"))
        specs = {
            "flops": {"target_flops": flops_keep},
            "latency@flops": {"target_latency": 1.0, "target_flops": flops_keep, "latency_table": table_path},
            "latency 0.6": {"target_latency": 0.6, "latency_table": table_path},
        }
        variants: dict[str, ir.Model] = {"unpruned": base}
        notes: dict[str, str] = {}
        for label, opts in specs.items():
            ctx = PassContext(calibration_data=calib, reference_model=base)
            m = _copy(base)
            create_pass("prune-channels", opts, ctx)(m)
            create_pass("reconstruct", {}, ctx)(m)
            variants[label] = m
            if label == "latency@flops" and int8 and "quantize-int8" in available_passes():
                q = _copy(m)
                try:
                    create_pass("quantize-int8", {}, ctx)(q)
                    variants[label + " +int8"] = q
                except Exception as e:  # report, don't hide
                    print(f"{name}: quantize-int8 failed after pruning: {e}", file=sys.stderr)
        # onnxsim at our parameter count (bisection on its sparsity; it may not reach it).
        target = _params(variants["latency@flops"])
        lo, hi, best = 0.0, 0.95, None
        for _ in range(7):
            mid = (lo + hi) / 2
            cand = _onnxsim(base, mid)
            p = _params(cand)
            if best is None or abs(p - target) < abs(_params(best) - target):
                best = cand
            lo, hi = (mid, hi) if p > target else (lo, mid)
        variants["onnxsim"] = best
        notes["onnxsim"] = f"params {_params(best) / _params(base):.3f} (target {target / _params(base):.3f})"
        cov_ours = _coverage(base, _prune_copy(base, calib))
        cov_sim = _coverage(base, _onnxsim(base, 0.5))
        p0, f0 = _params(base), _flops(base)
        stats = {label: {"params": _params(m) / p0, "flops": _flops(m) / f0} for label, m in variants.items()}
        metric = {label: float(case.metric(ref, outputs(m))) for label, m in variants.items()}
        from onnxforge.ir.io import model_to_bytes
        from onnxforge.passes.prune.latency import timed

        feeds = held[0]
        blobs = {label: model_to_bytes(m) for label, m in variants.items()}
        cpu = timed(blobs, feeds, rounds=rounds)  # thread CPU time medians (1 thread)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bench_interleaved(blobs, feeds, rounds=rounds, per_round=3, warmup=2, optimize="all",
                                    threads=threads)
        base_ms = res["unpruned"].p50_ms
        for label in variants:
            row = {"model": name, "variant": label, **stats[label], "p50_ms": res[label].p50_ms,
                   "latency_ratio": res[label].p50_ms / base_ms, "cpu_ms": cpu[label],
                   "cpu_ratio": cpu[label] / cpu["unpruned"], "metric": metric[label],
                   "metric_name": case.metric_name, "coverage": cov_sim if label == "onnxsim" else cov_ours,
                   "note": notes.get(label, "")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion ``p`` observed on ``n`` samples."""
    if n <= 0:
        return (float("nan"), float("nan"))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def run_recover(models: list[str], rounds: int, *, flops_keep: float = 0.7, n_train: int = 384, n_eval: int = 200,
                epochs: int = 3, criterion: str = "l1", save_dir: str | None = None, lr: float = 1e-4) -> list[dict]:
    """prune (30 % of FLOPs, latency-aware) -> reconstruct -> distill -> int8 on suite models.

    Distillation: the ``distill`` pass, teacher = the fp32 original, ``n_train`` generated *unlabeled*
    calibration inputs (``case.calibration_feeds``); the metric is judged on ``n_eval`` held-out
    ``case.eval_feeds`` (disjoint) with a 95 % Wilson interval. Latency: thread CPU time and wall
    p50, ORT_ENABLE_ALL, 1 thread, batch 1, all variants interleaved.
    """
    import time

    from onnxforge.ir.io import model_to_bytes
    from onnxforge.passes.prune.latency import timed
    from onnxforge.runtime.session import make_session
    from onnxforge.testing.real_suite import load_case

    rows = []
    cache = os.path.join(os.path.dirname(__file__), "..", ".onnxforge-cache")
    for name in models:
        case = load_case(name)
        base = ir.serde.deserialize_model(onnx.load(str(case.model_path)))
        train = case.calibration_feeds(n_train)
        held = case.eval_feeds(n_eval)
        small = CalibrationData.from_iterable(train[:64])

        def outputs(m: ir.Model) -> list[dict]:
            sess = make_session(m, optimize="all").session
            names = [o.name for o in sess.get_outputs()]
            return [dict(zip(names, sess.run(None, f))) for f in held]

        ref = outputs(base)
        table_path = os.path.abspath(os.path.join(cache, f"latency-{name}.json"))
        variants: dict[str, ir.Model] = {"unpruned": base}
        seconds: dict[str, float] = {}
        q = _copy(base)
        create_pass("quantize-int8", {}, PassContext(calibration_data=small))(q)
        variants["int8 only"] = q
        m = _copy(base)
        ctx = PassContext(calibration_data=small, reference_model=base)
        t = time.perf_counter()
        create_pass("prune-channels", {"target_latency": 1.0, "target_flops": flops_keep, "latency_table": table_path,
                                       "criterion": criterion}, ctx)(m)
        variants["pruned"] = _copy(m)
        create_pass("reconstruct", {}, ctx)(m)
        variants["pruned +rec"] = _copy(m)
        seconds["pruned +rec"] = time.perf_counter() - t
        t = time.perf_counter()
        res = create_pass("distill", {"epochs": epochs, "max_samples": n_train, "lr": lr},
                          PassContext(calibration_data=CalibrationData.from_iterable(train), reference_model=base))(m)
        seconds["pruned +rec +distill"] = time.perf_counter() - t
        print(f"{name}: distill {seconds['pruned +rec +distill']:.0f} s; {res.stats.notes}", file=sys.stderr, flush=True)
        variants["pruned +rec +distill"] = _copy(m)
        create_pass("quantize-int8", {}, PassContext(calibration_data=small, reference_model=base))(m)
        variants["pruned +rec +distill +int8"] = m
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            for label, v in variants.items():
                ir.save(v, os.path.join(save_dir, f"{name}-{label.replace(' ', '').replace('+', '_')}.onnx"))
        p0, f0 = _params(base), _flops(base)
        blobs = {label: model_to_bytes(v) for label, v in variants.items()}
        cpu = timed(blobs, held[0], rounds=rounds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wall = bench_interleaved(blobs, held[0], rounds=rounds, per_round=3, warmup=2, optimize="all", threads=1)
        for label, v in variants.items():
            metric = float(case.metric(ref, outputs(v)))
            lo, hi = wilson(metric, n_eval)
            row = {"model": name, "variant": label, "flops": _flops(v) / f0, "params": _params(v) / p0,
                   "cpu_ratio": cpu[label] / cpu["unpruned"], "wall_ratio": wall[label].p50_ms / wall["unpruned"].p50_ms,
                   "metric": metric, "ci95": [lo, hi], "n_eval": n_eval, "metric_name": case.metric_name,
                   "build_s": seconds.get(label)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def recover_table(rows: list[dict]) -> str:
    lines = ["| model | variant | FLOPs | params | latency ratio (CPU time) | ratio of wall p50 | top-1 agreement vs fp32 [95 % CI] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['flops']:.3f} | {r['params']:.3f} | **{r['cpu_ratio']:.3f}** | "
                     f"{r['wall_ratio']:.3f} | **{r['metric']:.3f}** [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                     f"(n={r['n_eval']}) |")
    return "\n".join(lines)


def _prune_copy(base: ir.Model, calib) -> ir.Model:
    m = _copy(base)
    create_pass("prune-channels", {"ratio": 0.5}, PassContext(calibration_data=calib))(m)
    return m


IMPORTANCE = ("l1", "l2", "bn-scale", "activation", "entropy", "reconstruction", "taylor", "random")


def compare_importance(models: list[str], settings: list[str]) -> list[dict]:
    """Every criterion at each prune setting (``ratio=0.5`` / ``target_latency=0.8`` ...), then
    ``reconstruct``; the task metric on held-out data before and after. digits_cnn: test accuracy
    (taylor from a torch digits CNN trained and exported here, as the criterion needs gradients);
    suite models: their metric vs fp32 (no taylor: no torch model)."""
    from onnxforge.runtime.session import make_session

    rows = []
    for name in models:
        importance = None
        if name == "digits_cnn":
            from onnxforge.testing import digits
            from onnxforge.passes.prune.importance import taylor_importance_from_torch
            from onnxforge.testing.zoo import export_model
            import torch

            x_train, y_train, x_test, y_test = digits.load_digits_split()
            module = digits.train_digits_cnn(seed=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = export_model(module, (torch.from_numpy(x_train[:1]),))
            inp = base.graph.inputs[0].name
            batches = [(torch.from_numpy(x_train[i:i + 128]), torch.from_numpy(y_train[i:i + 128]).long())
                       for i in range(0, len(x_train), 128)]
            importance = taylor_importance_from_torch(module, torch.nn.functional.cross_entropy, batches)
            calib = CalibrationData.from_iterable([{inp: x_train[i:i + 128]} for i in range(0, len(x_train), 128)])
            score = lambda m: digits.accuracy(m, x_test, y_test)  # noqa: E731
            metric_name = "accuracy"
        else:
            from onnxforge.testing.real_suite import load_case

            case = load_case(name)
            base = ir.serde.deserialize_model(onnx.load(str(case.model_path)))
            calib = CalibrationData.from_iterable(case.calibration_feeds(16))
            held = case.eval_feeds(32)

            def outs(m):
                sess = make_session(m, optimize="all").session
                names = [o.name for o in sess.get_outputs()]
                return [dict(zip(names, sess.run(None, f))) for f in held]

            ref = outs(base)
            score = lambda m: float(case.metric(ref, outs(m)))  # noqa: E731
            metric_name = case.metric_name
        fp32 = score(base)
        for setting in settings:
            key, _, value = setting.partition("=")
            opts = {key: float(value)}
            if key == "target_latency":
                opts["latency_table"] = os.path.abspath(os.path.join(
                    os.path.dirname(__file__), "..", ".onnxforge-cache", f"latency-{name}-raw.json"))
            for crit in IMPORTANCE:
                if crit == "taylor" and importance is None:
                    continue
                ctx = PassContext(calibration_data=calib, reference_model=base, importance=importance, seed=0)
                m = _copy(base)
                d = create_pass("prune-channels", {**opts, "criterion": crit}, ctx)(m).stats.details
                pruned = score(m)
                create_pass("reconstruct", {}, ctx)(m)
                row = {"model": name, "setting": setting, "criterion": crit, "fp32": fp32, "pruned": pruned,
                       "reconstructed": score(m), "flops": d["flops_after"] / d["flops_before"], "metric": metric_name}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def importance_table(rows: list[dict]) -> str:
    lines = ["| model | setting | FLOPs | criterion | pruned | + reconstruct | fp32 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['flops']:.3f} | {r['criterion']} | {r['pruned']:.4f} | "
                     f"{r['reconstructed']:.4f} | {r['fp32']:.4f} ({r['metric']}) |")
    return "\n".join(lines)


def suite_table(rows: list[dict]) -> str:
    lines = ["| model | variant | FLOPs | params | CPU ms | latency ratio (CPU time) | ratio of wall p50 | speedup / FLOPs reduction | metric | coverage |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = "" if r["variant"] == "unpruned" else f"{r['flops'] / r['cpu_ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['flops']:.3f} | {r['params']:.3f} | {r['cpu_ms']:.2f} | "
                     f"{r['cpu_ratio']:.3f} | {r['latency_ratio']:.3f} | {eff} | {r['metric']:.3f} ({r['metric_name']}) | "
                     f"{r['coverage']:.2f} |")
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
    ap.add_argument("--suite", default=None, help="trained-model suite names (e.g. orientation,effnet): 30%% FLOPs cut")
    ap.add_argument("--flops-keep", type=float, default=0.7)
    ap.add_argument("--importance", default=None,
                    help="compare importance criteria on these models (digits_cnn and/or suite names)")
    ap.add_argument("--settings", default="ratio=0.5,target_latency=0.8", help="prune settings for --importance")
    ap.add_argument("--recover", default=None,
                    help="suite names: prune 30%% FLOPs -> reconstruct -> distill -> int8, metric on --n-eval held-out")
    ap.add_argument("--n-train", type=int, default=384, help="--recover: unlabeled inputs to distill on")
    ap.add_argument("--n-eval", type=int, default=200, help="--recover: held-out inputs to judge on")
    ap.add_argument("--epochs", type=int, default=3, help="--recover: distill epochs")
    ap.add_argument("--criterion", default="l1", help="--recover: prune-channels criterion")
    ap.add_argument("--lr", type=float, default=1e-4, help="--recover: distill learning rate")
    ap.add_argument("--save-dir", default=None, help="--recover: write every variant here")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.recover:
        rows = run_recover(args.recover.split(","), args.rounds, flops_keep=args.flops_keep, n_train=args.n_train,
                           n_eval=args.n_eval, epochs=args.epochs, criterion=args.criterion, save_dir=args.save_dir,
                           lr=args.lr)
        cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
        print(f"\nmachine: {cpu}; {os.cpu_count()} cores (shared); {platform.python_version()}\n")
        print(recover_table(rows))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if args.importance:
        rows = compare_importance(args.importance.split(","), args.settings.split(","))
        print(importance_table(rows))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if args.suite:
        rows = run_suite(args.suite.split(","), args.rounds, args.flops_keep, threads=args.threads or 1)
        cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
        print(f"\nmachine: {cpu}; {os.cpu_count()} cores (shared); {platform.python_version()}\n")
        print(suite_table(rows))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return
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
