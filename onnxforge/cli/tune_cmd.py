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
@click.option("--latency", "latency_mode", type=click.Choice(["bench", "cpu", "size"]), default="bench", show_default=True,
              help="bench: measured, interleaved with the original; cpu: thread CPU time, one thread "
                   "(steadier on a shared machine); size: serialized-size ratio (deterministic).")
@click.option("--target", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Also write one self-contained HTML page: Pareto plot and front, the chosen pipeline's "
                   "per-pass table, per-layer quantization error, ops left float.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
def tune(model, calibration_data, eval_data, metric, max_drop, max_latency_ms, budget, output, space_path, strategy,
         sampler, jobs, executor, cache_dir, no_cache, out_dir, seed, batch_size, threads, latency_mode, target,
         report_path, quiet):
    """Search pass settings of MODEL for the accuracy-speed trade-off; write the chosen model.

    Evaluates up to BUDGET candidate pipelines (pruning ratio and criterion, int8/dynamic
    quantization and its calibration, fusion, reconstruction), shows the Pareto front of latency
    vs metric, and writes the fastest candidate within --max-drop to --output, with the pipeline
    that rebuilds it (onnxforge optimize MODEL --config <stem>.onnxforge.toml).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from onnxforge.cli._console import console as make_console
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
    console = make_console(stderr=True, quiet=quiet)
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
        report.render(result, outcome.base, metric, make_console())
    if report_path:  # also when nothing met --max-drop or the run was interrupted: the page shows why
        _tune_html(report_path, model, outcome, metric, calibration_data, seed, target)
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
        console.print(f"wrote {outcome.output}, {outcome.config}, {outcome.plot}, {outcome.json}"
                      + (f", {report_path}" if report_path else ""))
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
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Also write one self-contained HTML page: sensitivity plot and table, and (with calibration "
                   "data) the per-layer quantization error of int8 everywhere and the ops left float.")
@click.option("-q", "--quiet", is_flag=True)
def sensitivity(model, calibration_data, eval_data, metric, ratio, criterion, quantize_options, what, out_dir, seed,
                report_path, quiet):
    """Per-layer accuracy impact of pruning each prunable layer alone and quantizing each node alone."""
    from onnxforge.cli._console import console as make_console
    from onnxforge.tune.sensitivity import render, run_sensitivity

    result = run_sensitivity(model, eval_data=eval_data, calibration_data=calibration_data, metric=metric,
                             ratio=ratio, criterion=criterion, quantize_options=quantize_options, what=what,
                             out_dir=out_dir, seed=seed)
    if report_path:
        _sensitivity_html(report_path, model, result, calibration_data, quantize_options, what, seed)
    if not quiet:
        render(result, make_console())
        make_console(stderr=True).print(f"wrote {result['plot']}, {result['json']}"
                                        + (f", {report_path}" if report_path else ""))


def _quant_details(model, pipeline: str, calibration_data, seed: int, target: str = "cpu"):
    """Rerun ``pipeline`` for its per-pass report, SQNR per quantized layer and the ops left float."""
    import warnings

    from onnxforge.report import collect
    from onnxforge.runtime.data import CalibrationData

    report, float_model, final = collect.rerun(model, pipeline, calibration=calibration_data, seed=seed,
                                               target=target)
    if not any(r.name.startswith("quantize") for r in report.records):
        return report, None, "", None
    if calibration_data is not None:
        from onnxforge.runtime import data as cd

        data, note = cd.load(calibration_data, final), "Inputs: up to 16 samples of the calibration data."
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, note = CalibrationData.synthetic(final, 8), "Inputs: 8 random samples (no calibration data given)."
    return report, collect.quant_error(report, float_model, final, data), note, collect.float_ops(report)


def _tune_html(path, model, outcome, metric, calibration_data, seed, target) -> None:
    from onnxforge.report.html import tune_page

    result = outcome.result
    chosen_report = sqnr = floats = None
    note = ""
    if result.chosen is not None:
        chosen_report, sqnr, note, floats = _quant_details(model, result.chosen.pipeline, calibration_data, seed,
                                                           target)
    png = outcome.plot.read_bytes() if outcome.plot and pathlib.Path(outcome.plot).exists() else None
    tune_page(result, model=str(model), metric=metric, base=outcome.base, plot_png=png, chosen_report=chosen_report,
              sqnr=sqnr, sqnr_note=note, floats=floats).write(path)


def _sensitivity_html(path, model, result, calibration_data, quantize_options, what, seed) -> None:
    from onnxforge.report.html import sensitivity_page

    sqnr = floats = None
    note = ""
    notes = []
    if calibration_data is not None and what in ("both", "quantize"):
        q = f"quantize-int8({quantize_options})" if quantize_options else "quantize-int8"
        pipeline = f"{result['base']},{q}" if result.get("base") else q
        _report, sqnr, note, floats = _quant_details(model, pipeline, calibration_data, seed)
        note = f"Every weighted layer int8 at once ({q}). " + note
    elif what != "prune":
        notes.append("per-layer quantization error needs --calibration-data")
    png = pathlib.Path(result["plot"]).read_bytes() if result.get("plot") else None
    sensitivity_page(result, plot_png=png, sqnr=sqnr, sqnr_note=note, floats=floats, notes=notes).write(path)
