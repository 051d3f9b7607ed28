"""``tune()``: the whole of ``onnxforge tune`` as one call (the CLI and the benchmark use it).

Writes, beside ``output`` unless ``out_dir`` says otherwise: the chosen model (``output``), the
pipeline that produced it as ``<output stem>.onnxforge.toml`` (``onnxforge optimize MODEL --config
<that file>`` rebuilds the same bytes), ``pareto.png`` and ``tune.json``. An interrupted run writes a
partial ``tune.json`` (and its finished candidates are in the cache), but no model.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
from typing import Callable

from onnxforge.errors import PipelineSpecError
from onnxforge.tune import report
from onnxforge.tune.cache import Cache, hash_arrays, hash_source
from onnxforge.tune.evaluate import Candidate, EvalSettings, EvalSpec, Evaluator, load_eval_data, sha256
from onnxforge.tune.search import Tuner, TuneResult
from onnxforge.tune.space import Space, default_space, load_space


@dataclasses.dataclass
class TuneOutcome:
    result: TuneResult
    output: pathlib.Path | None
    config: pathlib.Path | None
    plot: pathlib.Path | None
    json: pathlib.Path | None
    reproduced: bool | None
    space: Space
    base: str


def config_path_for(output: pathlib.Path) -> pathlib.Path:
    return output.with_name(output.stem + ".onnxforge.toml")


def tune(
    model: str | os.PathLike,
    *,
    eval_data: str | os.PathLike | dict,
    calibration_data: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    space: str | os.PathLike | Space | None = None,
    settings: EvalSettings | None = None,
    strategy: str = "optuna",
    sampler: str = "tpe",
    budget: int = 40,
    seed: int = 0,
    pass_seed: int | None = None,
    jobs: int = 1,
    executor: str = "local",
    cache_dir: str | os.PathLike | None = ".onnxforge-cache",
    max_latency_ms: float | None = None,
    out_dir: str | os.PathLike | None = None,
    refine: int = 3,
    on_result: Callable[[Candidate, Candidate | None], None] | None = None,
    write: bool = True,
) -> TuneOutcome:
    from onnxforge.ir.io import load

    model_path = pathlib.Path(model)
    original = load(model_path)
    from onnxforge.ir.io import model_to_bytes

    model_bytes = model_to_bytes(original)
    settings = settings or EvalSettings()
    settings.seed = seed if pass_seed is None else pass_seed  # the passes' seed (search seed: ``seed``)
    inputs = [v.name for v in original.graph.inputs if v.name not in original.graph.initializers]
    if isinstance(eval_data, dict):
        eval_arrays = eval_data
    else:
        eval_arrays = load_eval_data(str(eval_data), inputs, settings.metric)
    calib = str(pathlib.Path(calibration_data).resolve()) if calibration_data else None
    if isinstance(space, Space):
        the_space = space
    elif space is not None:
        the_space = load_space(space)
    else:
        the_space = default_space(with_calibration=calib is not None, max_drop=settings.max_drop)
    if not the_space.slots:
        raise PipelineSpecError("the search space has no passes (see the notes: passes not registered?)")
    if cache_dir:
        _share_latency_table(the_space, pathlib.Path(cache_dir), sha256(model_bytes))
    # budgeted quantize-int8 candidates record their measured decisions here (replayed on rebuild)
    scratch = None
    if cache_dir:
        decisions_dir = str((pathlib.Path(cache_dir) / "decisions").resolve())
    else:
        scratch = tempfile.TemporaryDirectory(prefix="onnxforge-tune-")
        decisions_dir = scratch.name
    spec = EvalSpec(model_bytes, eval_arrays, settings, calibration=calib, model_path=str(model_path),
                    decisions_dir=decisions_dir)
    try:
        return _search_and_write(spec, the_space, cache_dir, calib, settings, model_path, output, out_dir,
                                 strategy=strategy, sampler=sampler, budget=budget, seed=seed, jobs=jobs,
                                 executor=executor, max_latency_ms=max_latency_ms, refine=refine,
                                 on_result=on_result, write=write)
    finally:
        if scratch is not None:
            scratch.cleanup()


def _search_and_write(spec: EvalSpec, the_space: Space, cache_dir, calib: str | None, settings: EvalSettings,
                      model_path: pathlib.Path, output, out_dir, *, strategy: str, sampler: str, budget: int,
                      seed: int, jobs: int, executor: str, max_latency_ms: float | None, refine: int,
                      on_result, write: bool) -> TuneOutcome:
    evaluator = Evaluator(spec)
    eval_arrays = spec.eval_arrays
    data_hash = sha256((hash_source(calib) + hash_arrays(eval_arrays)).encode())
    cache = Cache(cache_dir, evaluator.model_sha256, data_hash, settings.key()) if cache_dir else None
    tuner = Tuner(the_space, spec, cache=cache, strategy=strategy, sampler=sampler, budget=budget, seed=seed,
                  jobs=jobs, executor=executor, max_drop=settings.max_drop, max_latency_ms=max_latency_ms,
                  refine=refine, on_result=on_result, evaluator=evaluator)
    result = tuner.run()

    out_path = pathlib.Path(output) if output else None
    folder = pathlib.Path(out_dir) if out_dir else (out_path.parent if out_path else pathlib.Path("."))
    outcome = TuneOutcome(result, None, None, None, None, None, the_space, the_space.base)
    if not write:
        return outcome
    folder.mkdir(parents=True, exist_ok=True)
    if out_path is not None and result.chosen is not None and not result.interrupted:
        outcome.output, outcome.config, outcome.reproduced = _write_chosen(
            evaluator, result.chosen, out_path, model_path, calib, settings)
    outcome.json = folder / "tune.json"
    data = report.to_json(result, settings=dataclasses.asdict(settings), space=the_space.to_dict(),
                          model=str(model_path), output=str(outcome.output) if outcome.output else None,
                          config=str(outcome.config) if outcome.config else None, strategy=strategy,
                          budget=budget, seed=seed, reproduced=outcome.reproduced)
    report.write_json(data, outcome.json)
    if any(c.ok and c.latency_ratio is not None for c in result.candidates):
        outcome.plot = folder / "pareto.png"
        label = ("latency ratio (candidate / original)" if settings.latency in ("bench", "cpu")
                 else "size ratio (candidate / original)")
        report.plot(result, outcome.plot, settings.metric, settings.max_drop, latency_label=label)
    return outcome


def _share_latency_table(space: Space, cache_dir: pathlib.Path, model_sha: str) -> None:
    """Candidates that prune on measured latency share one latency table per model and base
    pipeline (measured by the first, read by the rest), so the search does not re-measure it
    per candidate and the chosen pipeline rebuilds from the same table."""
    for slot in space.slots:
        if slot.name == "prune-channels" and "target_latency" in slot.options and "latency_table" not in slot.options:
            key = sha256(f"{model_sha}|{space.base}".encode())[:16]
            cache_dir.mkdir(parents=True, exist_ok=True)
            slot.options["latency_table"] = str((cache_dir / f"latency-{key}.json").resolve())
            space.notes.append(f"prune-channels: latency table shared by the candidates: {slot.options['latency_table']}")


def _write_chosen(evaluator: Evaluator, chosen: Candidate, out_path: pathlib.Path, model_path: pathlib.Path,
                  calib: str | None, settings: EvalSettings) -> tuple[pathlib.Path, pathlib.Path, bool]:
    """Rebuild the chosen candidate, save it and its pipeline config; check the bytes match."""
    import warnings

    from onnxforge.atomic import atomic_write_bytes
    from onnxforge.ir.io import model_to_bytes, save
    from onnxforge.passes.spec import PipelineConfig, config_to_toml, parse_pipeline
    from onnxforge.tune.budget import budgeted, record_path

    if out_path.resolve() == model_path.resolve():
        raise PipelineSpecError("output path is the input path; onnxforge never overwrites its input")
    model = evaluator.build_model(chosen.pipeline)
    reproduced = sha256(model_to_bytes(model)) == chosen.model_sha256
    specs = parse_pipeline(chosen.pipeline)
    if budgeted(specs) and evaluator.spec.decisions_dir:
        # the config replays the decisions measured with tune's metric (optimize has no metric)
        record = record_path(evaluator.spec.decisions_dir, evaluator, chosen.pipeline)
        if record.exists():
            copy = out_path.with_name(out_path.stem + ".quantize-decisions.json")
            shutil.copyfile(record, copy)
            for s in specs:
                if s.name == "quantize-int8" and s.options.get("max_drop") is not None and "decisions" not in s.options:
                    s.options["decisions"] = str(copy.resolve())
    if not reproduced:
        warnings.warn(f"rebuilding the chosen pipeline gave different bytes than during the search: "
                      f"some pass is not deterministic, or the search result came from a cache another build "
                      f"wrote ({chosen.pipeline})", RuntimeWarning, stacklevel=3)
    save(model, out_path)
    config_file = config_path_for(out_path)
    calib_rel = None
    if calib:
        try:
            calib_rel = os.path.relpath(calib, config_file.resolve().parent)
        except ValueError:  # another drive (Windows)
            calib_rel = calib
    config = PipelineConfig(passes=specs, target=settings.target,
                            calibration_data=calib_rel, seed=settings.seed)
    text = (f"# written by onnxforge tune for {model_path.name}: reproduce with\n"
            f"#   onnxforge optimize {model_path.name} --config {config_file.name} -o {out_path.name}\n"
            + config_to_toml(config))
    atomic_write_bytes(config_file, text.encode())
    return out_path, config_file, reproduced
