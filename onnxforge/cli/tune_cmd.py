"""``onnxforge tune`` (search pass settings, show the Pareto front) and ``onnxforge sensitivity``."""

from __future__ import annotations

import pathlib
import sys

import click

from onnxforge.cli import main
from onnxforge.errors import PipelineSpecError


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--calibration-data", type=click.Path(path_type=pathlib.Path),
              help=".npz of arrays named like the model inputs (or a folder); needed by quantize-int8, "
                   "reconstruct and activation-based pruning.")
@click.option("--eval-data", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help=".npz: one array per model input (named like it, samples first) and, for top1, 'labels'.")
@click.option("--metric", default="top1", show_default=True,
              help="top1 (vs labels), cosine or max-abs (vs the original's outputs), or module:function "
                   "(function(outputs, data) -> float, higher is better).")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Largest allowed metric drop (top1: percentage points; cosine: 1-cos; max-abs: the error).")
@click.option("--max-latency-ms", type=float, default=None,
              help="Instead of the fastest within --max-drop: the best metric at or under this latency.")
@click.option("--budget", type=int, default=40, show_default=True, help="Distinct candidates to evaluate.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Where to write the chosen model (default MODEL.tuned.onnx); its pipeline goes beside it "
                   "as <stem>.onnxforge.toml.")
@click.option("--space", "space_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Search space TOML ([[space]] entries; see onnxforge.tune.space). Default: built-in space.")
@click.option("--strategy", type=click.Choice(["optuna", "grid"]), default="optuna", show_default=True)
@click.option("--sampler", type=click.Choice(["tpe", "nsga2"]), default="tpe", show_default=True,
              help="Optuna sampler (multi-objective, constrained by --max-drop).")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Build and score candidates in N worker processes (timing stays serial).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: Ray tasks (pip install 'onnxforge[ray]'; local instance unless RAY_ADDRESS is set).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              default=pathlib.Path(".onnxforge-cache"), show_default=True,
              help="Results cache; a rerun or a resumed run evaluates nothing twice.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the cache.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Where pareto.png and tune.json go (default: beside --output).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the search and of the passes.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Batch size the latency is measured at.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="onnxruntime intra-op threads while timing (0: onnxruntime decides).")
@click.option("--latency", "latency_mode", type=click.Choice(["bench", "size"]), default="bench", show_default=True,
              help="bench: measured, interleaved with the original; size: serialized-size ratio (deterministic).")
@click.option("--target", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
def tune(model, calibration_data, eval_data, metric, max_drop, max_latency_ms, budget, output, space_path, strategy,
         sampler, jobs, executor, cache_dir, no_cache, out_dir, seed, batch_size, threads, latency_mode, target,
         quiet):
    """Search pass settings of MODEL for the accuracy-speed trade-off; write the chosen model.

    Evaluates up to BUDGET candidate pipelines (pruning ratio and criterion, int8/dynamic
    quantization and its calibration, fusion, reconstruction), shows the Pareto front of latency
    vs metric, and writes the fastest candidate within --max-drop to --output, with the pipeline
    that rebuilds it (onnxforge optimize MODEL --config <stem>.onnxforge.toml).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from onnxforge.tune import report
    from onnxforge.tune.evaluate import EvalSettings
    from onnxforge.tune.runner import tune as run_tune

    output = output or model.with_name(model.stem + ".tuned.onnx")
    if output.resolve() == model.resolve():
        raise PipelineSpecError("output path is the input path; onnxforge never overwrites its input")
    if jobs < 1:
        raise PipelineSpecError("--jobs must be at least 1")
    settings = EvalSettings(metric=metric, max_drop=max_drop, latency=latency_mode, batch_size=batch_size,
                            threads=threads or None, target=target)
    console = Console(stderr=True, quiet=quiet)
    progress = Progress(TextColumn("[bold]tune[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[best]}"), console=console, transient=False, disable=quiet)
    task = progress.add_task("tune", total=budget, best="")

    def on_result(cand, best):
        text = ""
        if best is not None and best.latency_ratio is not None:
            text = f"best: latency ×{best.latency_ratio:.3f}, {metric} {best.metric:.4g} (drop {best.drop:.3g})"
        progress.update(task, advance=1, best=text)

    with progress:
        outcome = run_tune(model, eval_data=eval_data, calibration_data=calibration_data, output=output,
                           space=space_path, settings=settings, strategy=strategy, sampler=sampler, budget=budget,
                           seed=seed, jobs=jobs, executor=executor, cache_dir=None if no_cache else cache_dir,
                           max_latency_ms=max_latency_ms, out_dir=out_dir, on_result=on_result)
    result = outcome.result
    if not quiet:
        report.render(result, outcome.base, metric, Console())
    if result.interrupted:
        click.echo(f"onnxforge: interrupted; finished results are in {outcome.json} and the cache: "
                   "run the same command again to resume", err=True)
        sys.exit(130)
    if result.chosen is None:
        from onnxforge.errors import OnnxforgeError

        what = f"within --max-drop {max_drop}" + (f" and under {max_latency_ms} ms" if max_latency_ms else "")
        raise OnnxforgeError(f"no candidate {what}; see {outcome.json} (raise --max-drop or --budget)")
    c = result.chosen
    if not quiet:
        console.print(f"chosen: latency ratio {c.latency_ratio:.3f}, {metric} {c.metric:.4g} (drop {c.drop:.3g}), "
                      f"size ratio {c.size_ratio:.3f}")
        console.print(f"wrote {outcome.output}, {outcome.config}, {outcome.plot}, {outcome.json}")
        if outcome.reproduced is False:
            console.print("[yellow]warning: the rebuilt model differs from the evaluated one "
                          "(a pass is not deterministic)[/yellow]")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--calibration-data", type=click.Path(path_type=pathlib.Path),
              help="Needed for quantization (and activation-based pruning).")
@click.option("--eval-data", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Same format as for tune: inputs by name, plus 'labels' for top1.")
@click.option("--metric", default="top1", show_default=True, help="top1, cosine, max-abs or module:function.")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="Pruning ratio applied to one layer at a time.")
@click.option("--criterion", default="l1", show_default=True, help="Pruning criterion.")
@click.option("--quantize-options", default="", help='Options for quantize-int8, e.g. "calibration=minmax".')
@click.option("--what", type=click.Choice(["both", "prune", "quantize"]), default="both", show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=pathlib.Path("."),
              show_default=True, help="Where sensitivity.png and sensitivity.json go.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True)
def sensitivity(model, calibration_data, eval_data, metric, ratio, criterion, quantize_options, what, out_dir, seed,
                quiet):
    """Per-layer accuracy impact of pruning each prunable layer alone and quantizing each node alone."""
    from rich.console import Console

    from onnxforge.tune.sensitivity import render, run_sensitivity

    result = run_sensitivity(model, eval_data=eval_data, calibration_data=calibration_data, metric=metric,
                             ratio=ratio, criterion=criterion, quantize_options=quantize_options, what=what,
                             out_dir=out_dir, seed=seed)
    if not quiet:
        render(result, Console())
        Console(stderr=True).print(f"wrote {result['plot']}, {result['json']}")
