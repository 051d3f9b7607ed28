"""What ``onnxforge tune`` shows and writes: the front as a table, ``pareto.png``, ``tune.json``."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from onnxforge.tune.evaluate import Candidate
from onnxforge.tune.search import TuneResult


def short_pipeline(pipeline: str, base: str) -> str:
    """The pipeline without the base prefix (what the search chose)."""
    if base and pipeline.startswith(base):
        rest = pipeline[len(base):].lstrip(",")
        return rest or "(base only)"
    return pipeline


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(result: TuneResult, base: str, metric: str, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Pareto front ({len(result.front)} of {len(result.candidates)} candidates)",
                  title_justify="left")
    # A named first column: an empty header reads as a broken table in a CI log.
    for col, just in [("chosen", "center"), ("latency ratio", "right"), ("latency ms", "right"),
                      ("size ratio", "right"), (metric, "right"), ("drop", "right")]:
        table.add_column(col, justify=just, no_wrap=True)
    table.add_column("settings (after the base pipeline)", overflow="fold")
    for c in result.front:
        mark = "[bold green]★[/bold green]" if result.chosen is not None and c.pipeline == result.chosen.pipeline else ""
        table.add_row(mark, _fmt(c.latency_ratio, ".3f"), _fmt(c.latency_ms, ".4f"), _fmt(c.size_ratio, ".3f"),
                      _fmt(c.metric, ".4g"), _fmt(c.drop, ".4g"), short_pipeline(c.pipeline, base))
    console.print(table)
    stopped = sum(1 for c in result.candidates if c.status == "early-stop")
    failed = sum(1 for c in result.candidates if c.status == "failed")
    console.print(f"evaluated {result.evaluations} new, {result.cache_hits} from cache; "
                  f"{stopped} stopped early, {failed} failed")
    for note in result.notes:
        console.print(f"[dim]note: {note}[/dim]")


def plot(result: TuneResult, path: str | pathlib.Path, metric: str, max_drop: float | None = None,
         latency_label: str = "latency ratio (candidate / original)") -> None:
    """``pareto.png``: every timed candidate, the front highlighted, the chosen point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ok = [c for c in result.candidates if c.ok and c.latency_ratio is not None]
    front_ids = {id(c) for c in result.front}
    rest = [c for c in ok if id(c) not in front_ids]
    ax.scatter([c.latency_ratio for c in rest], [c.metric for c in rest], s=18, color="#999999",
               label="candidate", zorder=2)
    front = sorted(result.front, key=lambda c: c.latency_ratio)
    ax.plot([c.latency_ratio for c in front], [c.metric for c in front], "-o", color="#1f77b4", ms=6,
            label="Pareto front", zorder=3)
    if result.chosen is not None and result.chosen.latency_ratio is not None:
        ax.scatter([result.chosen.latency_ratio], [result.chosen.metric], s=220, marker="*", color="#d62728",
                   label="chosen", zorder=4)
    baseline = next((c.baseline_metric for c in result.candidates if c.baseline_metric is not None), None)
    if baseline is not None:
        ax.axhline(baseline, color="#2ca02c", lw=0.8, ls="--", label="original")
        if max_drop is not None:
            sign = -1 if metric != "max-abs" else 1
            ax.axhline(baseline + sign * max_drop, color="#ff7f0e", lw=0.8, ls=":", label="max drop")
    ax.axvline(1.0, color="#2ca02c", lw=0.8, ls="--")
    ax.set_xlabel(latency_label)
    ax.set_ylabel(metric)
    ax.set_title(f"onnxforge tune: {len(ok)} timed candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    from onnxforge.atomic import atomic_write_bytes
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(pathlib.Path(path), buf.getvalue())


def to_json(result: TuneResult, *, settings: dict[str, Any], space: dict[str, Any], model: str,
            output: str | None, config: str | None, strategy: str, budget: int, seed: int,
            reproduced: bool | None = None) -> dict[str, Any]:
    def row(c: Candidate) -> dict[str, Any]:
        return c.to_dict()

    return {
        "model": model,
        "strategy": strategy,
        "budget": budget,
        "seed": seed,
        "settings": settings,
        "space": space,
        "partial": result.interrupted,
        "evaluations": result.evaluations,
        "cache_hits": result.cache_hits,
        "notes": result.notes,
        "chosen": row(result.chosen) if result.chosen else None,
        "output": output,
        "config": config,
        "reproduced": reproduced,
        "front": [c.pipeline for c in result.front],
        "candidates": [row(c) for c in result.candidates],
    }


def write_json(data: dict[str, Any], path: str | pathlib.Path) -> None:
    from onnxforge.atomic import atomic_write_bytes

    atomic_write_bytes(pathlib.Path(path), json.dumps(data, indent=2, default=str).encode())
