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
              help="Write the per-pass report as JSON.")
@click.option("--bench/--no-bench", default=False, help="Measure latency before/after (interleaved) and add it to the report.")
@click.option("--external-data", is_flag=True, help="Store weights in an external data file beside the output.")
@click.option("--reproducer-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="On a failing pass, write its input model and a replay command here.")
@click.option("--seed", type=int, default=None, help="Seed for passes that use randomness.")
@click.option("-q", "--quiet", is_flag=True, help="No table; only errors.")
def optimize(model, output, passes_text, preset, config_path, target, calibration_data, verify, fixed_point,
             explain, report_path, bench, external_data, reproducer_dir, seed, quiet):
    """Run a pass pipeline over MODEL and write the result (default pipeline: preset O1, lossless)."""
    from rich.console import Console

    from onnxforge.ir.io import load, save
    from onnxforge.passes.base import PassContext
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

    output = output or model.with_name(model.stem + ".opt.onnx")
    if output.resolve() == model.resolve():
        raise PipelineSpecError("output path is the input path; onnxforge never overwrites its input")

    console = Console(stderr=True, quiet=quiet)
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
    options = {"num_samples": config.num_samples} if config.num_samples else {}
    context = PassContext(target=config.target, calibration_data=data, explain=explain, seed=config.seed,
                          options=options)
    pipeline = Pipeline(config.passes, context=context, verify=config.verify, fixed_point=config.fixed_point,
                        max_iterations=config.max_iterations, reproducer_dir=reproducer_dir,
                        on_pass=lambda r: console.print(
                            f"[dim]{r.name}: {'changed' if r.modified else 'no change'} "
                            f"({r.seconds * 1000:.0f} ms)[/dim]", highlight=False))
    original_bytes = None
    if bench:
        from onnxforge.ir.io import model_to_bytes

        original_bytes = model_to_bytes(ir_model)
    try:
        result = pipeline.run(ir_model)
    except Exception:
        # The report of the passes that did run is still useful to a CI log.
        raise
    report = result.report
    if bench:
        report.extra["latency"] = _bench_before_after(original_bytes, result.model, data)
    save(result.model, output, external_data=True if external_data else None)
    report.extra["output"] = str(output)
    if report_path:
        report.write_json(report_path)
    if not quiet:
        # Results go to stdout (progress went to stderr); wide when written to a CI log.
        console = Console(width=None if sys.stdout.isatty() else 150)
        report.render(console)
        if "latency" in report.extra:
            lat = report.extra["latency"]
            console.print(f"latency p50: {lat['before_ms']:.3f} ms → {lat['after_ms']:.3f} ms "
                          f"(ratio {lat['ratio']:.2f}, interleaved, {lat['providers']})")
        console.print(f"wrote {output}")
        _print_skips(console, report, explain)


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
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="onnxforge passes", title_justify="left", show_lines=verbose)
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
