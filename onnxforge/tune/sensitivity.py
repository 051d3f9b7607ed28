"""``onnxforge sensitivity``: how much the metric drops when one layer alone is pruned or quantized.

The model first goes through the lossless base pipeline (O1's registered passes), so layer names are
the ones the lossy passes see. Then, for each layer:

- **prune**: ``prune-channels(ratio, criterion, protect=[every other prunable layer])``: only that
  layer's dependency group loses channels (``protect`` blocks a whole group). The groups come from
  one unrestricted dry run of the pass (``stats.details["groups"]``).
- **quantize**: ``quantize-int8(exclude=[every other weighted node])``: only that Conv / Gemm /
  MatMul gets int8 weights and input (neighbouring int8-capable ops that touch it may follow, as the
  pass decides).

The drop is measured on the eval data with the same metrics as ``tune``. The result is the basis for
per-layer settings: layers with a small drop can take a larger ratio / int8; those with a large one
belong in ``protect`` / ``exclude``.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

from onnxforge.passes.spec import PassSpec, format_pipeline

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _base_pipeline() -> str:
    from onnxforge.passes.registry import available_passes
    from onnxforge.tune.space import _available_base

    return _available_base("O1", available_passes(), [])


def _run_stats(model_bytes: bytes, pipeline: str, calibration: Any, seed: int):
    from onnxforge.ir.io import load
    from onnxforge.passes.base import PassContext
    from onnxforge.passes.manager import Pipeline
    from onnxforge.runtime import data as cd

    model = load(model_bytes)
    ctx = PassContext(calibration_data=cd.load(calibration, model) if calibration else None, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Pipeline(pipeline, context=ctx).run(model)
    return result


def run_sensitivity(model: str | os.PathLike, *, eval_data: Any, calibration_data: Any = None, metric: str = "top1",
                    ratio: float = 0.5, criterion: str = "l1", quantize_options: str = "", what: str = "both",
                    out_dir: str | os.PathLike = ".", seed: int = 0, write: bool = True) -> dict[str, Any]:
    from onnxforge.ir.io import load, model_to_bytes
    from onnxforge.passes.registry import available_passes
    from onnxforge.passes.spec import parse_pipeline
    from onnxforge.tune.evaluate import EvalSettings, EvalSpec, Evaluator, load_eval_data

    original = load(pathlib.Path(model))
    calib = str(pathlib.Path(calibration_data).resolve()) if calibration_data else None
    base = _base_pipeline()
    base_model = _run_stats(model_to_bytes(original), base, calib, seed).model if base else original
    base_bytes = model_to_bytes(base_model)
    inputs = [v.name for v in base_model.graph.inputs if v.name not in base_model.graph.initializers]
    arrays = eval_data if isinstance(eval_data, dict) else load_eval_data(str(eval_data), inputs, metric)
    ev = Evaluator(EvalSpec(base_bytes, arrays, EvalSettings(metric=metric, latency="size", seed=seed),
                            calibration=calib))
    passes = available_passes()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    if what in ("both", "prune"):
        if "prune-channels" not in passes:
            notes.append("prune-channels is not registered here: no pruning sensitivity")
        else:
            probe = _run_stats(base_bytes, format_pipeline([PassSpec("prune-channels", {"ratio": ratio,
                                                                                         "criterion": criterion})]),
                               calib, seed)
            groups = []
            for rec in probe.report.records:
                for g in (rec.stats.get("details") or {}).get("groups", []):
                    if g.get("removed") and g.get("layers"):
                        groups.append(list(g["layers"]))
            for i, layers in enumerate(groups):
                others = sorted({n for j, g in enumerate(groups) if j != i for n in g} - set(layers))
                opts: dict[str, Any] = {"ratio": ratio, "criterion": criterion}
                if others:
                    opts["protect"] = others
                pipeline = format_pipeline([PassSpec("prune-channels", opts)])
                cand, _ = ev.build_and_score(pipeline)
                rows.append({"kind": "prune", "layer": layers[0], "group": layers, "drop": cand.drop,
                             "metric": cand.metric, "size_ratio": cand.size_ratio, "status": cand.status,
                             "error": cand.error, "pipeline": pipeline})
    if what in ("both", "quantize"):
        if "quantize-int8" not in passes:
            notes.append("quantize-int8 is not registered here: no quantization sensitivity")
        elif calib is None:
            notes.append("quantization sensitivity needs --calibration-data")
        else:
            extra = parse_pipeline(f"quantize-int8({quantize_options})")[0].options if quantize_options else {}
            weighted = [n.name for n in base_model.graph if n.op_type in WEIGHTED and n.name]
            for name in weighted:
                others = [n for n in weighted if n != name]
                opts = {**extra, **({"exclude": others} if others else {})}
                pipeline = format_pipeline([PassSpec("quantize-int8", opts)])
                cand, _ = ev.build_and_score(pipeline)
                rows.append({"kind": "quantize", "layer": name, "group": [name], "drop": cand.drop,
                             "metric": cand.metric, "size_ratio": cand.size_ratio, "status": cand.status,
                             "error": cand.error, "pipeline": pipeline})
    result: dict[str, Any] = {"model": str(model), "metric": metric, "baseline": ev.baseline(), "ratio": ratio,
                              "criterion": criterion, "base": base, "rows": rows, "notes": notes,
                              "plot": None, "json": None}
    if write:
        folder = pathlib.Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        result["json"] = str(folder / "sensitivity.json")
        if rows:
            result["plot"] = str(folder / "sensitivity.png")
            plot(result, result["plot"])
        import json

        from onnxforge.atomic import atomic_write_bytes

        atomic_write_bytes(pathlib.Path(result["json"]), json.dumps(result, indent=2, default=str).encode())
    return result


def render(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"sensitivity ({result['metric']}, baseline {result['baseline']:.4g})", title_justify="left")
    for col, just in [("what", "left"), ("layer", "left"), ("drop", "right"), (result["metric"], "right"),
                      ("size ratio", "right")]:
        table.add_column(col, justify=just)
    for r in sorted(result["rows"], key=lambda r: (r["kind"], -(r["drop"] or 0))):
        label = r["layer"] + (f" (+{len(r['group']) - 1})" if len(r["group"]) > 1 else "")
        drop = "failed" if r["drop"] is None else f"{r['drop']:.4g}"
        table.add_row(r["kind"], label, drop, "-" if r["metric"] is None else f"{r['metric']:.4g}",
                      "-" if r["size_ratio"] is None else f"{r['size_ratio']:.3f}")
    console.print(table)
    for n in result["notes"]:
        console.print(f"[dim]note: {n}[/dim]")


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxforge.atomic import atomic_write_bytes

    kinds = [k for k in ("prune", "quantize") if any(r["kind"] == k for r in result["rows"])]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 2.2 + 0.9 * len(kinds) * 2), dpi=110, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        ax.bar(range(len(rows)), [r["drop"] or 0.0 for r in rows],
               color="#d62728" if kind == "prune" else "#1f77b4")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["layer"] for r in rows], rotation=45, ha="right", fontsize=7)
        title = (f"prune one layer alone (ratio {result['ratio']}, {result['criterion']})" if kind == "prune"
                 else "quantize one node alone (int8)")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(f"{result['metric']} drop")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(pathlib.Path(path), buf.getvalue())


__all__ = ["plot", "render", "run_sensitivity"]
