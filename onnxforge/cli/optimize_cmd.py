"""``onnxforge optimize`` and ``onnxforge passes``."""

from __future__ import annotations

import json
import pathlib
import sys

import click

from onnxforge.cli import main
from onnxforge.errors import CalibrationDataError, PipelineSpecError


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Where to write the optimized model (default: MODEL.opt.onnx beside the input).")
@click.option("--passes", "passes_text", metavar="PIPELINE",
              help='Pipeline text, e.g. "O1,prune-channels(ratio=0.3)". Default: preset O1.')
@click.option("--preset", type=click.Choice(["O1", "O2", "O3"]), help="A preset pass list.")
@click.option("--config", "config_path", type=click.Path(path_type=pathlib.Path),
              help="onnxforge.toml, or a pyproject.toml with [tool.onnxforge].")
@click.option("--target", type=click.Choice(["cpu", "cuda", "tensorrt", "onnx"]), default=None,
              help="Deployment target (default cpu; 'onnx' = standard ops only).")
@click.option("--calibration-data", type=click.Path(path_type=pathlib.Path),
              help=".npz of named input arrays (leading axis = samples) or a folder of .npz files.")
@click.option("--verify", is_flag=True, default=None, help="Check outputs after every pass; name the first that breaks tolerance.")
@click.option("--fixed-point", is_flag=True, default=None, help="Repeat lossless passes until nothing changes.")
@click.option("--explain", is_flag=True, help="List patterns that almost matched, with the reason.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Write the report: FILE.html = one self-contained page (per-pass table, plots, per-layer "
                   "quantization error, ops left float); any other name = JSON.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary (exit code, output path, per-pass figures) on stdout and nothing else "
                   "there: for CI.")
@click.option("--bench/--no-bench", default=False, help="Measure latency before/after (interleaved) and add it to the report.")
@click.option("--external-data", is_flag=True, help="Store weights in an external data file beside the output.")
@click.option("--reproducer-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="On a failing pass, write its input model and a replay command here.")
@click.option("--seed", type=int, default=None, help="Seed for passes that use randomness.")
@click.option("-q", "--quiet", is_flag=True, help="No table; only errors.")
@click.option("--max-memory", metavar="SIZE", default=None,
              help="Refuse up front (exit 2) when the pipeline is estimated to need more RAM than this, e.g. 8G.")
@click.option("--decisions", "decisions", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="quantize-int8's decision record (JSON): written with what was measured when the file "
                   "does not exist, replayed without measuring when it does, so the same command rebuilds "
                   "byte-identical output (e.g. --preset O3 in CI).")
@click.option("--metric", "metric", metavar="top1|MODULE:FUNCTION", default=None,
              help="quantize-int8's max_drop as a drop of this task metric on the calibration data instead of its "
                   "proxy: function(outputs, data[, float_outputs]) -> float, higher is better (as for tune); "
                   "a 'labels' array in the calibration .npz reaches it as data['labels']; top1: a classifier's "
                   "top-1 accuracy against those labels.")
def optimize(model, output, passes_text, preset, config_path, target, calibration_data, verify, fixed_point,
             explain, report_path, as_json, bench, external_data, reproducer_dir, seed, quiet, max_memory=None, decisions=None,
             metric=None):
    """Run a pass pipeline over MODEL and write the result (default pipeline: preset O1, lossless)."""
    from onnxforge.errors import OnnxforgeError

    done: list = []  # records of the passes that ran, for the JSON summary of a failed run
    from onnxforge.ir.io import spilling

    try:
        # New large weights go to a scratch file beside the output as passes make them (issue 14).
        with spilling((output or model).resolve().parent):
            report, output = _optimize(model, output, passes_text, preset, config_path, target, calibration_data,
                                       verify, fixed_point, explain, report_path, as_json, bench, external_data,
                                       reproducer_dir, seed, quiet, done, max_memory=max_memory,
                                       decisions=decisions, metric=metric)
    except OnnxforgeError as e:
        page = report_path is not None and report_path.suffix.lower() in (".html", ".htm") and bool(done)
        if page:
            _write_failure_html(report_path, model, done, e, str(passes_text or preset or config_path or "O1"),
                                target or "cpu")
        if as_json:
            _emit_json({"ok": False, "exit_code": e.exit_code, "error": str(e), "error_type": type(e).__name__,
                        "model": str(model), "output": None, "passes": [_pass_summary(r) for r in done],
                        "report": str(report_path) if page else None})
        raise  # the CLI prints the one-line error on stderr and exits with e.exit_code
    if as_json:
        _emit_json({"ok": True, "exit_code": 0, "error": None, "model": str(model), "output": str(output),
                    "report": str(report_path) if report_path else None, **_run_summary(report)})


def _optimize(model, output, passes_text, preset, config_path, target, calibration_data, verify, fixed_point,
              explain, report_path, as_json, bench, external_data, reproducer_dir, seed, quiet, done,
              max_memory=None, decisions=None, metric=None):
    from onnxforge.cli._console import console as make_console
    from onnxforge.ir.io import load, save
    from onnxforge.passes.manager import Pipeline
    from onnxforge.passes.spec import DEFAULT_PRESET, PRESETS, PipelineConfig, load_config, parse_pipeline
    from onnxforge.runtime import data as calibration

    chosen = [x for x in (passes_text, preset, config_path) if x]
    if len(chosen) > 1:
        raise PipelineSpecError("give only one of --passes, --preset, --config")
    if config_path:
        config = load_config(config_path)
    else:
        text = passes_text or PRESETS[preset or DEFAULT_PRESET]
        config = PipelineConfig(passes=parse_pipeline(text))
    # Command-line flags override the config file.
    if target:
        config.target = target
    if calibration_data:
        config.calibration_data = str(calibration_data)
    if verify is not None:
        config.verify = verify
    if fixed_point is not None:
        config.fixed_point = fixed_point
    if seed is not None:
        config.seed = seed
    if metric:
        config.metric = metric

    output = output or model.with_name(model.stem + ".opt.onnx")
    if output.resolve() == model.resolve():
        raise PipelineSpecError("output path is the input path; onnxforge never overwrites its input")
    html_report = report_path is not None and report_path.suffix.lower() in (".html", ".htm")

    progress = make_console(stderr=True, quiet=quiet)
    ir_model = load(model)
    data = None
    if config.calibration_data:
        data = calibration.load(config.calibration_data, ir_model)
    elif any(s.name in _DATA_PASSES for s in config.passes):
        names = sorted({s.name for s in config.passes if s.name in _DATA_PASSES})
        raise CalibrationDataError(
            f"{', '.join(names)} {'needs' if len(names) == 1 else 'need'} calibration data: "
            "pass --calibration-data data.npz "
            "(arrays named like the model inputs, leading axis = samples)"
        )
    # the config's target, seed, providers and num_samples, in one place (spec.PipelineConfig.context)
    context = config.context(data, explain=explain)
    if decisions is not None:
        context.options["decisions"] = str(decisions)
    if config.metric:
        from onnxforge.passes.quantize.task_metric import TaskMetric

        context.options["metric"] = TaskMetric(config.metric, [v.name for v in ir_model.graph.outputs], data)
    snapshot = None
    if html_report:
        from onnxforge.report.collect import FloatSnapshot

        snapshot = FloatSnapshot(ir_model)

    def on_pass(record):
        done.append(record)
        if snapshot is not None:
            snapshot(record)
        progress.print(f"[dim]{record.name}: {'changed' if record.modified else 'no change'} "
                       f"({record.seconds * 1000:.0f} ms)[/dim]", highlight=False)

    pipeline = Pipeline(config.passes, context=context, verify=config.verify, fixed_point=config.fixed_point,
                        max_iterations=config.max_iterations, reproducer_dir=reproducer_dir, on_pass=on_pass)
    if max_memory:
        _check_memory(max_memory, ir_model, pipeline, config.verify, bench)
    original_bytes = None
    if bench:
        from onnxforge.ir.io import model_to_bytes

        original_bytes = model_to_bytes(ir_model)
    result = pipeline.run(ir_model)
    report = result.report
    if bench:
        report.extra["latency"] = _bench_before_after(original_bytes, result.model, data)
    save(result.model, output, external_data=True if external_data else None)
    report.extra["output"] = str(output)
    if html_report:
        _write_html(report_path, report, model, snapshot.reference, result.model, data)
    elif report_path:
        report.write_json(report_path)
    if not quiet and not as_json:
        # Results go to stdout (progress went to stderr); full width when written to a CI log.
        console = make_console()
        report.render(console)
        if "latency" in report.extra:
            lat = report.extra["latency"]
            console.print(f"latency p50: {lat['before_ms']:.3f} ms → {lat['after_ms']:.3f} ms "
                          f"(ratio {lat['ratio']:.2f}, interleaved, {lat['providers']})")
        console.print(f"wrote {output}" + (f", {report_path}" if report_path else ""))
        _print_skips(console, report, explain)
    return report, output


def _write_html(path, report, model_path, float_model, final_model, data) -> None:
    """The HTML page; per-layer SQNR on the calibration data (else 8 seeded random samples)."""
    import warnings

    from onnxforge.report import collect
    from onnxforge.report.html import optimize_page
    from onnxforge.runtime.data import CalibrationData

    sqnr = floats = None
    sqnr_note = ""
    if any(r.name.startswith("quantize") for r in report.records):
        floats = collect.float_ops(report)
        if data is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = CalibrationData.synthetic(final_model, 8)
            sqnr_note = "Inputs: 8 random samples (no calibration data given)."
        else:
            sqnr_note = "Inputs: up to 16 samples of the calibration data."
        sqnr = collect.quant_error(report, float_model, final_model, data)
    optimize_page(report, model=str(model_path), sqnr=sqnr, sqnr_note=sqnr_note, floats=floats).write(path)


def _check_memory(limit_text: str, ir_model, pipeline, verify: bool, bench: bool) -> None:
    """``--max-memory``: refuse before any work when the estimated peak exceeds the limit."""
    from onnxforge.errors import UnsupportedModelError
    from onnxforge.ir.io import largest_tensor_bytes, tensor_bytes
    from onnxforge.runtime.memory import BASE_BYTES, estimate_peak, parse_size

    try:
        limit = parse_size(limit_text)
    except ValueError as e:
        raise PipelineSpecError(f"--max-memory: {e}") from None
    names = [getattr(p, "name", "") or type(p).__name__ for p in pipeline.passes]
    est = estimate_peak(tensor_bytes(ir_model), largest_tensor_bytes(ir_model), names, verify=verify, bench=bench)
    if est.bytes > limit:
        raise UnsupportedModelError(
            f"--max-memory {limit_text}: this run is estimated to need {est.bytes / 2**30:.1f} GiB "
            f"({BASE_BYTES / 2**30:.1f} GiB for Python and its libraries, the rest for {est.culprit}: "
            f"{est.why}); raise the limit or drop that step"
        )


def _write_failure_html(path, model_path, done, error, pipeline: str, target: str) -> None:
    """A page for a failed run (a CI artifact): the passes that completed and the error, in red."""
    import re

    from onnxforge.passes.manager import Report
    from onnxforge.report.html import optimize_page

    named = re.search(r"pass '([^']+)'", str(error))
    report = Report(pipeline=pipeline, target=target, records=list(done),
                    before=dict(done[0].before), after=dict(done[-1].after),
                    failed_pass=named.group(1) if named else type(error).__name__, failure=str(error))
    page = optimize_page(report, model=str(model_path), notes=[
        f"The run failed (exit code {error.exit_code}): the table lists the passes that completed."])
    page.title += " · FAILED"
    page.write(path)


def _pass_summary(r) -> dict:
    return {
        "name": r.name,
        "iteration": r.iteration,
        "modified": r.modified,
        "lossless": r.lossless,
        "seconds": round(r.seconds, 4),
        "nodes": [r.before.get("nodes"), r.after.get("nodes")],
        "params": [r.before.get("params"), r.after.get("params")],
        "param_bytes": [r.before.get("param_bytes"), r.after.get("param_bytes")],
        "max_abs_vs_original": r.vs_original.max_abs if r.vs_original else None,
        "verified": r.verified,
        "counts": (r.stats.get("counts") or {}),
        "left_alone": len(r.stats.get("skipped") or []),
        "peak_rss": (getattr(r, "memory", None) or {}).get("peak_rss"),
    }


def _run_summary(report) -> dict:
    out = {
        "pipeline": report.pipeline,
        "target": report.target,
        "seconds": round(report.seconds, 4),
        "before": report.before,
        "after": report.after,
        "passes": [_pass_summary(r) for r in report.records],
    }
    if "latency" in report.extra:
        out["latency"] = report.extra["latency"]
    return out


def _emit_json(payload: dict) -> None:
    from onnxforge.passes.manager import _json_default

    sys.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


_DATA_PASSES = {"quantize-int8", "reconstruct"}


def _print_skips(console, report, explain: bool) -> None:
    for r in report.records:
        skipped = r.stats.get("skipped") or []
        if skipped and explain:
            console.print(f"[bold]{r.name}[/bold] left alone:")
            for s in skipped:
                console.print(f"  {s['node']} ({s['op_type']}): {s['reason']}")
        near = (r.stats.get("details") or {}).get("near_misses")
        if near and explain:
            console.print(f"[bold]{r.name}[/bold] near misses:")
            for item in near:
                console.print(f"  {item}")


def _bench_before_after(original_bytes: bytes, optimized, data) -> dict:
    from onnxforge.ir.io import model_to_bytes
    from onnxforge.runtime.bench import bench_interleaved

    feeds = None
    if data is not None:
        feeds = next(iter(data), None)
    results = bench_interleaved({"before": original_bytes, "after": model_to_bytes(optimized)}, feeds)
    before, after = results["before"], results["after"]
    return {
        "before_ms": before.p50_ms,
        "after_ms": after.p50_ms,
        "ratio": after.p50_ms / before.p50_ms if before.p50_ms else float("nan"),
        "providers": ",".join(after.providers_used),
    }


@main.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list.")
@click.option("-v", "--verbose", is_flag=True, help="Show each pass's full docstring.")
def list_passes(as_json: bool, verbose: bool) -> None:
    """List every registered pass (built-in and plugins) with its options."""
    import inspect

    from onnxforge.passes.base import summary_line
    from onnxforge.passes.registry import available_passes, describe_options
    from onnxforge.passes.spec import PRESETS

    passes = available_passes()
    if as_json:
        out = {
            name: {
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "lossless": bool(getattr(cls, "lossless", True)),
                "summary": summary_line(cls.__doc__),
                "options": [dict(name=n, type=t, default=d) for n, t, d in describe_options(cls)],
            }
            for name, cls in passes.items()
        }
        out_presets = {k: v for k, v in PRESETS.items()}
        json.dump({"passes": out, "presets": out_presets}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    from onnxforge.cli._console import console as make_console
    from onnxforge.cli._console import table as make_table

    console = make_console()
    table = make_table(title="onnxforge passes", title_justify="left", show_lines=verbose)
    table.add_column("pass", style="bold")
    table.add_column("lossless", justify="center")
    table.add_column("options")
    table.add_column("what it does")
    for name, cls in passes.items():
        opts = ", ".join(f"{n}: {t} = {d}" if d else f"{n}: {t}" for n, t, d in describe_options(cls))
        doc = inspect.cleandoc(cls.__doc__ or "") if verbose else summary_line(cls.__doc__)
        table.add_row(name, "yes" if getattr(cls, "lossless", True) else "no", opts, doc)
    console.print(table)
    for preset, text in PRESETS.items():
        console.print(f"[bold]{preset}[/bold] = {text}")
