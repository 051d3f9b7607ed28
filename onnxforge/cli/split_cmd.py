"""``onnxforge split``: cut a model into pipeline stages balanced by measured per-node cost."""

from __future__ import annotations

import pathlib

import click

from onnxforge.cli import main


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--stages", type=click.IntRange(min=1), required=True, help="Number of stages.")
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Folder for stage0.onnx ... and manifest.json.")
@click.option("--costs", type=click.Choice(["profile", "uniform"]), default="profile", show_default=True,
              help="profile: onnxruntime's profiler times every node; uniform: every node costs 1.")
@click.option("--max-width", type=click.IntRange(min=1), default=4, show_default=True,
              help="Widest frontier (tensors crossing a cut) considered when it balances better.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size of the profiling runs.")
def split(model, stages, out_dir, costs, max_width, batch_size):
    """Cut MODEL into --stages consecutive models at narrow frontiers, balanced by measured cost."""
    from onnxforge.cli._console import console as make_console
    from rich.table import Table

    from onnxforge.ir.io import load, model_to_bytes
    from onnxforge.runtime.stages import measure_costs, plan_stages, write_stages

    ir_model = load(model)
    blob = model_to_bytes(ir_model)
    node_costs = measure_costs(blob, batch_size=batch_size) if costs == "profile" else None
    plan = plan_stages(blob, stages, costs=node_costs, max_width=max_width)
    manifest = write_stages(plan, out_dir)
    console = make_console()
    unit = "µs" if plan.costs == "profile" else "nodes"
    total = sum(s.cost_us for s in plan.stages) or 1.0
    table = Table(title=f"split {model.name} into {stages} stage(s) (costs: {plan.costs})", title_justify="left")
    for col in ("stage", "nodes", f"cost ({unit})", "%", "inputs", "outputs"):
        table.add_column(col, justify="left" if col in ("inputs", "outputs") else "right")
    for s in plan.stages:
        table.add_row(s.file, str(s.nodes), f"{s.cost_us:,.0f}", f"{100 * s.cost_us / total:.0f}",
                      ", ".join(s.inputs), ", ".join(s.outputs))
    console.print(table)
    console.print(f"wrote {manifest}")
