"""Runtime commands: ``bench``, ``compare``, ``run``, ``profile``, ``tune-runtime``.

They share the execution-provider flags (:func:`provider_flags`): ``--provider`` (repeatable, in
order of preference; CPU is always the last resort), TensorRT/CUDA options, and CPU thread
counts. A flag for a provider that was not requested, an unknown provider or a bad value is one
line on stderr and exit code 2, like every other user mistake.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import click

from onnxforge.cli import main
from onnxforge.errors import CalibrationDataError, ModelLoadError, OnnxforgeError, ProviderError


class _Command(click.Command):
    """A click command whose usage errors (unknown flag, bad value) are one-line onnxforge errors."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            raise OnnxforgeError(f"{ctx.command_path}: {e.format_message()}") from None


# --------------------------------------------------------------------------- shared flags

_OPTIMIZE = click.Choice(["disable", "basic", "extended", "all"])


def provider_flags(f):
    """Execution-provider and thread flags shared by the runtime commands."""
    flags = [
        click.option("--provider", "providers", multiple=True, metavar="NAME",
                     help="Execution provider: cpu, cuda, tensorrt (or onnxruntime's full name). Repeatable, "
                          "in order of preference; CPU is always the last resort. Default: cpu."),
        click.option("--trt-fp16", is_flag=True, default=False, help="TensorRT: allow float16 kernels."),
        click.option("--trt-int8", is_flag=True, default=False, help="TensorRT: allow int8 kernels (QDQ models or a calibration table)."),
        click.option("--trt-engine-cache", type=click.Path(file_okay=False), metavar="DIR",
                     help="TensorRT: cache built engines in DIR (turns the engine cache on)."),
        click.option("--trt-timing-cache", type=click.Path(file_okay=False), metavar="DIR",
                     help="TensorRT: keep the timing cache in DIR."),
        click.option("--trt-workspace", type=int, metavar="BYTES", help="TensorRT: max workspace size in bytes."),
        click.option("--cuda-device", type=int, metavar="N", help="GPU id for CUDA and TensorRT (default 0)."),
        click.option("--cudnn-conv-algo", type=click.Choice(["EXHAUSTIVE", "HEURISTIC", "DEFAULT"], case_sensitive=False),
                     help="CUDA: cuDNN convolution algorithm search."),
        click.option("--intra-op-threads", type=int, metavar="N", help="CPU: threads inside an op (0 = onnxruntime decides)."),
        click.option("--inter-op-threads", type=int, metavar="N",
                     help="CPU: threads across independent ops (switches to parallel execution mode)."),
        click.option("--optimize", type=_OPTIMIZE, default=None,
                     help="onnxruntime graph optimization level (default: all; compare: disable)."),
    ]
    for flag in reversed(flags):
        f = flag(f)
    return f


@dataclass
class RuntimeSettings:
    """What the provider flags resolve to."""

    providers: list[str]
    provider_options: dict[str, Any]
    intra_op_threads: int | None
    optimize: str | None


_TRT_FLAGS = ("trt_fp16", "trt_int8", "trt_engine_cache", "trt_timing_cache", "trt_workspace")


def resolve_settings(kw: dict[str, Any]) -> RuntimeSettings:
    """Turn the provider flags (popped from ``kw``) into providers and typed options; refuse
    flags for providers that were not requested and conflicting values."""
    from onnxforge.runtime.providers import CPU, CUDA, TENSORRT, CPUOptions, parse_provider_options, provider_name

    names = [provider_name(p) for p in (kw.pop("providers", None) or ("cpu",))]
    providers = list(dict.fromkeys(names))
    options: dict[str, Any] = {}
    trt = {k: kw.pop(k, None) for k in _TRT_FLAGS}
    given_trt = [k for k, v in trt.items() if v not in (None, False)]
    if given_trt and TENSORRT not in providers:
        raise ProviderError(f"--{given_trt[0].replace('_', '-')} is a TensorRT option; add --provider tensorrt")
    cuda_device = kw.pop("cuda_device", None)
    conv_algo = kw.pop("cudnn_conv_algo", None)
    if cuda_device is not None and not ({CUDA, TENSORRT} & set(providers)):
        raise ProviderError("--cuda-device applies to the cuda and tensorrt providers; add --provider cuda or tensorrt")
    if conv_algo is not None and CUDA not in providers:
        raise ProviderError("--cudnn-conv-algo is a CUDA option; add --provider cuda")
    if TENSORRT in providers:
        trt_opts: dict[str, Any] = {"fp16": trt["trt_fp16"], "int8": trt["trt_int8"]}
        if trt["trt_engine_cache"]:
            trt_opts["engine_cache_dir"] = trt["trt_engine_cache"]
        if trt["trt_timing_cache"]:
            trt_opts["timing_cache_dir"] = trt["trt_timing_cache"]
        if trt["trt_workspace"] is not None:
            trt_opts["workspace_bytes"] = trt["trt_workspace"]
        if cuda_device is not None:
            trt_opts["device_id"] = cuda_device
        options[TENSORRT] = parse_provider_options(TENSORRT, trt_opts)
    if CUDA in providers and (cuda_device is not None or conv_algo is not None):
        cuda_opts: dict[str, Any] = {}
        if cuda_device is not None:
            cuda_opts["device_id"] = cuda_device
        if conv_algo is not None:
            cuda_opts["conv_algo_search"] = conv_algo.upper()
        options[CUDA] = parse_provider_options(CUDA, cuda_opts)
    intra = kw.pop("intra_op_threads", None)
    inter = kw.pop("inter_op_threads", None)
    for flag, value in (("--intra-op-threads", intra), ("--inter-op-threads", inter)):
        if value is not None and value < 0:
            raise ProviderError(f"{flag} must be >= 0 (0 = onnxruntime decides), got {value}")
    if inter is not None:
        options[CPU] = CPUOptions(inter_op_threads=inter, execution_mode="parallel")
    return RuntimeSettings(providers, options, intra, kw.pop("optimize", None))


def merge_threads(settings: RuntimeSettings, flag: str, value: int | None) -> int | None:
    """A command's own thread flag and ``--intra-op-threads`` mean the same thing: give one."""
    if value is not None and value < 0:
        raise ProviderError(f"{flag} must be >= 0 (0 = onnxruntime decides), got {value}")
    if value is not None and settings.intra_op_threads is not None and value != settings.intra_op_threads:
        raise ProviderError(f"{flag} {value} conflicts with --intra-op-threads {settings.intra_op_threads}; give one")
    return value if value is not None else settings.intra_op_threads


def _load_model(path: pathlib.Path):
    from onnxforge.ir.io import load

    return load(path)


def _guard_ort(what: str, hint: str = ""):
    """Turn onnxruntime's own exceptions while creating/running a session into one-line errors
    (``hint``, e.g. from :func:`_dim_hint`, is appended)."""

    def decorator(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (OnnxforgeError, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
                raise
            except Exception as exc:
                if type(exc).__module__.startswith("onnxruntime"):
                    text = str(exc).strip().splitlines()
                    raise ModelLoadError(f"{what}: onnxruntime failed: {text[0] if text else type(exc).__name__}"
                                         f"{hint}") from exc
                raise

        return wrapper

    return decorator


def _session(model_path: pathlib.Path, settings: RuntimeSettings, threads: int | None, default_optimize: str):
    from onnxforge.runtime.session import make_session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are reported in our output instead
        return _guard_ort(str(model_path))(make_session)(
            str(model_path), settings.providers, threads=threads,
            optimize=settings.optimize or default_optimize, provider_options=settings.provider_options,
        )


def _write_json(target: str | None, payload: dict[str, Any]) -> None:
    if not target:
        return
    text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    from onnxforge.atomic import atomic_write_text

    atomic_write_text(target, text)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _console(quiet_stdout: bool = False):
    from onnxforge.cli._console import console

    # Full width when piped (CI logs); nothing on stdout when it carries --json -.
    return console(discard=quiet_stdout, highlight=False)


def _providers_text(used: list[str], fallbacks: list[tuple[str, str]]) -> str:
    from onnxforge.runtime.providers import short_name

    text = "ran on: " + ", ".join(short_name(p) for p in used)
    for provider, reason in fallbacks:
        text += f"\n  fell back from {short_name(provider)}: {reason}"
    return text


def _parse_int_list(flag: str, text: str, *, minimum: int) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OnnxforgeError(f"{flag} expects comma-separated integers like 1,2,4, got {text!r}") from None
    if not values:
        raise OnnxforgeError(f"{flag} is empty")
    bad = [v for v in values if v < minimum]
    if bad:
        raise OnnxforgeError(f"{flag} values must be >= {minimum}, got {bad}")
    return values


def _dim_option(f):
    return click.option("--dim", "dims", multiple=True, metavar="NAME=N",
                        help="Size of a symbolic input dimension, e.g. seq=128 (repeatable; others: 1, "
                             "the batch axis: --batch-size).")(f)


def _parse_dims(dims: tuple[str, ...]) -> dict[str, int] | None:
    values: dict[str, int] = {}
    for item in dims:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise OnnxforgeError(f"--dim expects NAME=N, got {item!r}")
        try:
            values[name.strip()] = int(value)
        except ValueError:
            raise OnnxforgeError(f"--dim {item!r}: {value!r} is not an integer") from None
        if values[name.strip()] < 1:
            raise OnnxforgeError(f"--dim {item!r}: the size must be >= 1")
    return values or None


def _dim_hint(model, dims: dict[str, int] | None) -> str:
    """``"; ... try --dim height=N --dim width=N"`` when ``model`` has symbolic input dims (past the
    leading batch axis) that were not given a size: they ran as 1, which breaks e.g. a detector's
    Concat of up- and down-sampled maps. Empty when there are none."""
    given = set(dims or {})
    names: dict[str, None] = {}
    for value in model.graph.inputs:
        for axis, d in enumerate(value.shape or []):
            name = getattr(d, "value", None)
            if axis > 0 and isinstance(name, str) and name not in given:
                names[name] = None
    if not names:
        return ""
    flags = " ".join(f"--dim {n}=N" for n in names)
    return (f"; the model's symbolic input dims {', '.join(names)} ran with size 1: "
            f"if that is the problem, give real sizes, e.g. {flags}")


def _first_feed(inputs: pathlib.Path | None, model, batch_size: int | None):
    if inputs is None:
        return None
    from onnxforge.runtime.data import CalibrationData

    data = CalibrationData.from_npz(inputs, model, batch_size=batch_size or 1)
    return data[0]


# --------------------------------------------------------------------------- bench


@main.command(cls=_Command)
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@provider_flags
@click.option("--threads", type=int, metavar="N", help="Intra-op threads (same as --intra-op-threads).")
@click.option("--batch-size", type=int, metavar="B", help="Batch size for the dynamic batch axis (default 1).")
@click.option("--inputs", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help=".npz of named input arrays (first batch is used); default: random inputs.")
@click.option("--repeat", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--io-binding/--no-io-binding", default=None,
              help="Bind inputs/outputs on the device (default: on for cuda/tensorrt, off for cpu).")
@_dim_option
@click.option("--json", "json_path", metavar="FILE", help="Also write the result as JSON ('-' = stdout).")
def bench(model, threads, batch_size, inputs, repeat, warmup, io_binding, dims, json_path, **kw):
    """Latency (p50/p90/p99) and throughput of MODEL, and the providers that actually ran."""
    from onnxforge.cli._console import table as Table

    from onnxforge.runtime.tune import measure

    settings = resolve_settings(kw)
    threads = merge_threads(settings, "--threads", threads)
    if batch_size is not None and batch_size < 1:
        raise OnnxforgeError(f"--batch-size must be >= 1, got {batch_size}")
    ir_model = _load_model(model)
    feeds = _first_feed(inputs, ir_model, batch_size)
    info = _session(model, settings, threads, "all")
    dim_values = _parse_dims(dims)
    result, runner = _guard_ort(str(model), "" if inputs else _dim_hint(ir_model, dim_values))(measure)(
        info, feeds, batch_size=batch_size, warmup=warmup, repeat=repeat, io_binding=io_binding,
        provider_options=settings.provider_options, dim_values=dim_values,
    )
    console = _console(quiet_stdout=json_path == "-")
    table = Table(title=f"bench {model.name}", title_justify="left")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "throughput /s", "runs", "threads", "io binding"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result.batch_size), f"{result.p50_ms:.3f}", f"{result.p90_ms:.3f}", f"{result.p99_ms:.3f}",
        f"{result.throughput_per_s:,.1f}", str(result.n), "default" if threads in (None, 0) else str(threads),
        "on" if runner.io_binding else "off",
    )
    console.print(table)
    console.print(_providers_text(result.providers_used, result.fallbacks))
    payload = {"model": str(model), **result.to_dict(), "threads": threads, "io_binding": runner.io_binding,
               "requested_providers": settings.providers, "optimize": settings.optimize or "all"}
    _write_json(json_path, payload)


# --------------------------------------------------------------------------- compare


@main.command(cls=_Command)
@click.argument("reference", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@provider_flags
@click.option("--inputs", type=click.Path(path_type=pathlib.Path),
              help=".npz of named input arrays (leading axis = samples) or a folder of .npz files; "
                   "default: random inputs.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Use at most N samples (random: 8).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Samples per run (default 1).")
@_dim_option
@click.option("--json", "json_path", metavar="FILE", help="Also write the result as JSON ('-' = stdout).")
def compare(reference, candidate, inputs, samples, batch_size, dims, json_path, **kw):
    """Output differences of CANDIDATE against REFERENCE: max abs/rel error, cosine, top-1 agreement."""
    from onnxforge.cli._console import table as Table

    from onnxforge.runtime import data as data_mod
    from onnxforge.runtime.compare import compare as compare_outputs

    settings = resolve_settings(kw)
    ref_model = _load_model(reference)
    _load_model(candidate)  # clear one-line errors for a missing or broken file
    note = ""
    if inputs is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", data_mod.SyntheticDataWarning)
            n = samples or 8
            data = data_mod.CalibrationData.synthetic(ref_model, n, batch_size=batch_size,
                                                      dim_values=_parse_dims(dims))
        note = f"inputs: {n} random samples (no --inputs given)"
    else:
        data = data_mod.load(inputs, ref_model, batch_size=batch_size or 1, n=samples)
        note = f"inputs: {len(data)} batch(es) from {inputs}"
    ref_info = _session(reference, settings, settings.intra_op_threads, "disable")
    cand_info = _session(candidate, settings, settings.intra_op_threads, "disable")

    @_guard_ort(f"{reference} / {candidate}", "" if inputs else _dim_hint(ref_model, _parse_dims(dims)))
    def run_all():
        ref_names = [o.name for o in ref_info.session.get_outputs()]
        cand_names = [o.name for o in cand_info.session.get_outputs()]
        refs, cands = [], []
        for feeds in data:
            refs.append(dict(zip(ref_names, ref_info.session.run(ref_names, feeds))))
            cands.append(dict(zip(cand_names, cand_info.session.run(cand_names, feeds))))
        return refs, cands

    refs, cands = run_all()
    try:
        result = compare_outputs(refs, cands)
    except ValueError as e:
        raise CalibrationDataError(f"cannot compare {reference.name} and {candidate.name}: {e}") from None
    result.providers_used = {"reference": ref_info.providers_used, "candidate": cand_info.providers_used}

    console = _console(quiet_stdout=json_path == "-")
    table = Table(title=f"compare {reference.name} -> {candidate.name}", title_justify="left")
    for col in ("output", "shape", "max abs", "max rel", "mean abs", "cosine", "top-1 agree"):
        table.add_column(col, justify="right" if col not in ("output",) else "left")
    for o in result.per_output:
        table.add_row(o.name, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}",
                      f"{o.mean_abs:.3g}", f"{o.cosine:.6f}",
                      "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%")
    console.print(table)
    top1 = "-" if result.top1_agreement is None else f"{100 * result.top1_agreement:.2f}%"
    console.print(f"worst: max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g}, "
                  f"cosine {result.cosine:.6f}, top-1 agreement {top1}")
    console.print(note)
    console.print(_providers_text(cand_info.providers_used, cand_info.fallbacks))
    _write_json(json_path, {"reference": str(reference), "candidate": str(candidate), **result.to_dict(),
                            "inputs": str(inputs) if inputs else "random"})


# --------------------------------------------------------------------------- run


@main.command(cls=_Command)
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--inputs", type=click.Path(dir_okay=False, path_type=pathlib.Path), required=True,
              help=".npz of named input arrays, leading axis = samples.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=pathlib.Path), required=True,
              help="Where to write the outputs (.npz, arrays named like the model outputs, in input order).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes, each with its own session.")
@click.option("--threads-per-worker", type=int, metavar="T",
              help="Intra-op threads per worker (default: CPU cores / workers).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per session run.")
@click.option("--devices", metavar="IDS", help="GPU ids for the workers, e.g. 0,1 (worker i -> ids[i % n]).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: one Ray task per shard (local instance unless RAY_ADDRESS is set; CPU only).")
@click.option("--stages", type=click.IntRange(min=1), default=None,
              help="Pipeline: cut MODEL into N stages (see 'onnxforge split'), one process each; "
                   "reports the throughput against the whole model in one process.")
@provider_flags
@click.option("--json", "json_path", metavar="FILE", help="Also write timings as JSON ('-' = stdout).")
def run(model, inputs, output, workers, threads_per_worker, batch_size, devices, executor, stages, json_path, **kw):
    """Run MODEL over every sample in --inputs, split across --workers processes; outputs in input order."""
    import numpy as np

    from onnxforge.runtime.parallel import run_parallel

    settings = resolve_settings(kw)
    threads = merge_threads(settings, "--threads-per-worker", threads_per_worker)
    device_ids = _parse_int_list("--devices", devices, minimum=0) if devices else None
    if output.resolve() == inputs.resolve():
        raise OnnxforgeError("-o is the --inputs file; onnxforge never overwrites its input")
    if output.suffix != ".npz":
        raise OnnxforgeError(f"-o must be an .npz file, got {output}")
    _load_model(model)
    if stages is not None:
        if workers != 1 or executor != "local" or device_ids:
            raise OnnxforgeError("--stages runs one process per stage: leave --workers, --executor and --devices out")
        return _run_stages(model, inputs, output, stages, batch_size, threads, settings, json_path)
    if executor == "ray":
        from onnxforge.runtime.parallel import run_ray

        if device_ids:
            raise OnnxforgeError("--executor ray runs on CPU; leave --devices out")
        run_parallel = functools.partial(run_ray, address=os.environ.get("RAY_ADDRESS"))  # noqa: F811
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _guard_ort(str(model))(run_parallel)(
            str(model), inputs, workers=workers, threads_per_worker=threads, batch_size=batch_size,
            providers=settings.providers, provider_options=settings.provider_options,
            optimize=settings.optimize or "all", devices=device_ids,
        )
    buffer = io.BytesIO()
    np.savez(buffer, **result.outputs)
    from onnxforge.atomic import atomic_write_bytes

    atomic_write_bytes(output, buffer.getvalue())
    console = _console(quiet_stdout=json_path == "-")
    console.print(
        f"{result.n_samples} samples, {result.workers} worker(s) x {result.threads_per_worker} thread(s), "
        f"batch {result.batch_size}: {result.samples_per_s:,.1f} samples/s "
        f"(compute {result.compute_s:.3f} s, wall {result.wall_s:.3f} s incl. process start)"
    )
    console.print(_providers_text(result.providers_used[0], result.fallbacks[0]))
    console.print(f"wrote {output} ({', '.join(f'{k} {list(v.shape)}' for k, v in result.outputs.items())})")
    _write_json(json_path, {"model": str(model), "inputs": str(inputs), "output": str(output), **result.to_dict()})


def _run_stages(model, inputs, output, stages, batch_size, threads, settings, json_path):
    """``run --stages N``: split in memory, run the pipeline, then the whole model in one process."""
    import numpy as np

    from onnxforge.atomic import atomic_write_bytes
    from onnxforge.ir.io import load, model_to_bytes
    from onnxforge.runtime.parallel import run_parallel
    from onnxforge.runtime.stages import measure_costs, plan_stages, run_pipeline

    blob = model_to_bytes(load(model))
    optimize = settings.optimize or "disable"  # "disable": stage outputs equal the whole model's exactly
    plan = plan_stages(blob, stages, costs=measure_costs(blob))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _guard_ort(str(model))(run_pipeline)(plan.models, inputs, batch_size=batch_size,
                                                      threads_per_stage=threads or 1, optimize=optimize,
                                                      output_names=plan.outputs)
        single = _guard_ort(str(model))(run_parallel)(blob, inputs, workers=1, threads_per_worker=threads or 1,
                                                      batch_size=batch_size, optimize=optimize)
    buffer = io.BytesIO()
    np.savez(buffer, **result.outputs)
    atomic_write_bytes(output, buffer.getvalue())
    console = _console(quiet_stdout=json_path == "-")
    ratio = result.samples_per_s / single.samples_per_s if single.samples_per_s else float("nan")
    console.print(
        f"{result.n_samples} samples, {result.stages} stage process(es) x {result.threads_per_stage} thread(s), "
        f"batch {result.batch_size}: {result.samples_per_s:,.1f} samples/s; one process: "
        f"{single.samples_per_s:,.1f} samples/s ({ratio:.2f}x; compute {result.compute_s:.3f} s vs "
        f"{single.compute_s:.3f} s, wall {result.wall_s:.3f} s incl. process start)"
    )
    console.print(f"wrote {output} ({', '.join(f'{k} {list(v.shape)}' for k, v in result.outputs.items())})")
    _write_json(json_path, {"model": str(model), "inputs": str(inputs), "output": str(output), **result.to_dict(),
                            "one_process_samples_per_s": single.samples_per_s, "speedup": ratio,
                            "plan": plan.manifest()})


# --------------------------------------------------------------------------- profile


@main.command(name="profile", cls=_Command)
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@provider_flags
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="How many nodes to list.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Profiled runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Runs left out of the profile.")
@click.option("--threads", type=int, metavar="N", help="Intra-op threads (same as --intra-op-threads).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size for the dynamic batch axis.")
@click.option("--inputs", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help=".npz of named input arrays (first batch is used); default: random inputs.")
@_dim_option
@click.option("--json", "json_path", metavar="FILE", help="Also write the profile as JSON ('-' = stdout).")
def profile_cmd(model, top, runs, warmup, threads, batch_size, inputs, dims, json_path, **kw):
    """onnxruntime's profiler on MODEL: time per op type and the top-N nodes, with their provider."""
    from onnxforge.cli._console import table as Table

    from onnxforge.runtime.profile import profile

    settings = resolve_settings(kw)
    threads = merge_threads(settings, "--threads", threads)
    ir_model = _load_model(model)
    feeds = _first_feed(inputs, ir_model, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _guard_ort(str(model))(profile)(
            str(model), feeds, providers=settings.providers, provider_options=settings.provider_options,
            threads=threads, optimize=settings.optimize or "all", runs=runs, warmup=warmup, top=top,
            batch_size=batch_size, dim_values=_parse_dims(dims),
        )
    console = _console(quiet_stdout=json_path == "-")
    table = Table(title=f"profile {model.name}: time per op type ({result.runs} runs)", title_justify="left")
    for col in ("op type", "provider", "nodes", "ms / run", "%"):
        table.add_column(col, justify="left" if col in ("op type", "provider") else "right")
    for row in result.op_types:
        table.add_row(row.op_type, ",".join(row.providers), str(row.nodes), f"{row.mean_ms_per_run:.3f}", f"{row.percent:.1f}")
    console.print(table)
    nodes = Table(title=f"top {len(result.nodes)} nodes", title_justify="left")
    for col in ("node", "op type", "provider", "µs / call", "%"):
        nodes.add_column(col, justify="left" if col in ("node", "op type", "provider") else "right")
    for row in result.nodes:
        nodes.add_row(row.name, row.op_type, row.provider, f"{row.mean_us:.1f}", f"{row.percent:.1f}")
    console.print(nodes)
    console.print(f"kernels {result.kernel_ms_per_run:.3f} ms / run of {result.run_ms_per_run:.3f} ms "
                  f"({result.node_count} nodes as onnxruntime ran them, optimize={settings.optimize or 'all'})")
    console.print(_providers_text(result.providers_used, result.fallbacks))
    _write_json(json_path, {"model": str(model), **result.to_dict()})


# --------------------------------------------------------------------------- tune-runtime


@main.command(name="tune-runtime", cls=_Command)
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@provider_flags
@click.option("--batch-sizes", default="1,2,4,8,16", show_default=True, metavar="LIST",
              help="Batch sizes to try (models with a dynamic batch axis).")
@click.option("--threads", "threads_text", default=None, metavar="LIST",
              help="Intra-op thread counts to try, e.g. 1,2 (default: 1 and every power of two up to the cores).")
@click.option("--max-latency-ms", type=float, default=None, help="Latency bound for the recommendation.")
@click.option("--latency-stat", type=click.Choice(["p50", "p90", "p99"]), default="p90", show_default=True,
              help="Which latency percentile the bound applies to.")
@click.option("--repeat", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs per setting.")
@click.option("--io-binding/--no-io-binding", default=None,
              help="Bind inputs/outputs on the device (default: on for cuda/tensorrt).")
@_dim_option
@click.option("--json", "json_path", metavar="FILE", help="Also write the sweep as JSON ('-' = stdout).")
def tune_runtime(model, batch_sizes, threads_text, max_latency_ms, latency_stat, repeat, io_binding, dims, json_path,
                 **kw):
    """Sweep batch sizes and thread counts; recommend the highest throughput within --max-latency-ms."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from onnxforge.cli._console import table as Table

    from onnxforge.runtime.tune import tune

    settings = resolve_settings(kw)
    sizes = _parse_int_list("--batch-sizes", batch_sizes, minimum=1)
    dims = tuple(dims)
    _parse_dims(dims)  # refuse a bad --dim before the sweep starts
    if threads_text is not None and settings.intra_op_threads is not None:
        raise ProviderError("--threads and --intra-op-threads both set the thread counts; give one")
    if threads_text is not None:
        thread_counts = _parse_int_list("--threads", threads_text, minimum=0)
    elif settings.intra_op_threads is not None:
        thread_counts = [settings.intra_op_threads]
    else:
        cores = os.cpu_count() or 1
        thread_counts = [1] + [2**i for i in range(1, 8) if 2**i <= cores]
    if max_latency_ms is not None and max_latency_ms <= 0:
        raise OnnxforgeError(f"--max-latency-ms must be positive, got {max_latency_ms}")
    _load_model(model)
    rounds = 5 if repeat >= 5 else repeat
    per_round = max(1, repeat // rounds)

    from onnxforge.cli._console import console

    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console(stderr=True), transient=True) as bar:
        task = bar.add_task("tuning", total=None)

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _guard_ort(str(model))(tune)(
                str(model), batch_sizes=sizes, threads=thread_counts, providers=settings.providers,
                provider_options=settings.provider_options, optimize=settings.optimize or "all",
                max_latency_ms=max_latency_ms, latency_stat=latency_stat, rounds=rounds, per_round=per_round,
                io_binding=io_binding, dim_values=_parse_dims(dims), progress=progress,
            )

    console = _console(quiet_stdout=json_path == "-")
    bound = f" (bound: {latency_stat} <= {max_latency_ms:g} ms)" if max_latency_ms is not None else ""
    table = Table(title=f"tune-runtime {model.name}{bound}", title_justify="left")
    for col in ("threads", "batch", "p50 ms", "p90 ms", "p99 ms", "throughput /s", ""):
        table.add_column(col, justify="right")
    for p in result.points:
        mark = "best" if p is result.recommended else ("" if p.meets_bound else "over bound")
        table.add_row("default" if p.threads in (None, 0) else str(p.threads), str(p.batch_size), f"{p.p50_ms:.3f}",
                      f"{p.p90_ms:.3f}", f"{p.p99_ms:.3f}", f"{p.throughput_per_s:,.1f}", mark)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
    if result.recommended is not None:
        r = result.recommended
        console.print(f"recommended: batch {r.batch_size}, threads {r.threads if r.threads else 'default'} -> "
                      f"{r.throughput_per_s:,.1f} samples/s at {latency_stat} {r.latency(latency_stat):.3f} ms")
    console.print(_providers_text(result.providers_used, result.fallbacks))
    _write_json(json_path, {"model": str(model), **result.to_dict()})
