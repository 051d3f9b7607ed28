"""The instrumented pass manager: :class:`Pipeline` and its :class:`Report`.

Every pass is wrapped in instruments: wall time; nodes / parameters / parameter bytes before and after;
its own statistics (a :class:`~onnxforge.passes.base.PassStats`); and, with ``verify=True``, the
difference of the model's outputs against the previous step and against the original on the same
sample inputs. Verification is skipped for a pass that reports no change (its outputs cannot differ).
Every pass that reports a change also gets a structural check (:func:`onnxforge.ir.validate.check_structure`:
no dangling input, cycle, duplicate name or undefined graph output), verify or not; a failure is a
:class:`~onnxforge.errors.PassFailedError` naming the pass and the node.

Outputs are compared **by name** with the one comparator, :mod:`onnxforge.runtime.compare`: a graph
output that disappears, appears or is renamed, an output whose shape (or, for a lossless pass, dtype)
changes, and a graph input that is removed or newly required all fail verification, naming the pass.

Tolerances: a lossless pass must keep every output within ``atol + rtol * max|output|`` of the
previous step (``rtol = 1e-4``, ``atol = 1e-5``, fp32 rounding; ``max|output|`` over the verification
samples); a lossy pass (``lossless = False``) within its own ``tolerance`` as ``rtol``
(``tolerance = inf``: any values, but names and shapes are still checked). The first pass that breaks
its tolerance is named in a :class:`~onnxforge.errors.VerificationError`, and when ``reproducer_dir``
is set the model it received and a one-line command to replay it are written there.

``fixed_point=True`` repeats the lossless passes after the first run until none changes the model (at
most ``max_iterations`` rounds); lossy passes run exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxforge.errors import OnnxforgeError, PassFailedError, VerificationError
from onnxforge.passes.base import PassContext, StatsPassResult
from onnxforge.passes.registry import create_pass
from onnxforge.passes.spec import PassSpec, PipelineConfig, format_pipeline, parse_pipeline

logger = logging.getLogger(__name__)

LOSSLESS_RTOL = 1e-4
LOSSLESS_ATOL = 1e-5


@dataclasses.dataclass
class Fidelity:
    """Output difference of a model against a reference on the same inputs (worst over outputs)."""

    max_abs: float
    max_rel: float  # max_abs / max|reference|
    cosine: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PassRecord:
    """What one pass run did, as it appears in the report."""

    name: str
    spec: str
    iteration: int
    lossless: bool
    modified: bool
    seconds: float
    before: dict[str, int]
    after: dict[str, int]
    stats: dict[str, Any]
    vs_previous: Fidelity | None = None
    vs_original: Fidelity | None = None
    tolerance: float | None = None
    verified: bool | None = None  # None: not checked (verify off, or pass changed nothing)
    memory: dict[str, Any] | None = None  # peak RSS / anonymous / file bytes (runtime.memory.PeakMemory)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vs_previous"] = self.vs_previous.to_dict() if self.vs_previous else None
        d["vs_original"] = self.vs_original.to_dict() if self.vs_original else None
        return d


@dataclasses.dataclass
class Report:
    """The per-pass report of one pipeline run (terminal table, ``report.json``)."""

    pipeline: str
    target: str
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    before: dict[str, int] = dataclasses.field(default_factory=dict)
    after: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    failed_pass: str | None = None
    failure: str | None = None
    reproducer: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "target": self.target,
            "seconds": self.seconds,
            "before": self.before,
            "after": self.after,
            "failed_pass": self.failed_pass,
            "failure": self.failure,
            "reproducer": self.reproducer,
            "passes": [r.to_dict() for r in self.records],
            **self.extra,
        }

    def write_json(self, path: str | pathlib.Path) -> None:
        from onnxforge.atomic import atomic_write_bytes

        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        atomic_write_bytes(pathlib.Path(path), text.encode("utf-8"))

    def render(self, console=None) -> None:
        """Print the per-pass table with rich."""
        from rich.console import Console
        from rich.table import Table

        if console is None:
            import sys

            # Not a terminal (a log, a notebook's pipe): no window to fit, so do not cut cells to 80 columns.
            console = Console(width=None if sys.stdout.isatty() else 200)
        table = Table(title=f"onnxforge pipeline ({self.target})", title_justify="left")
        for col, just in [
            ("pass", "left"),
            ("changed", "center"),
            ("nodes", "right"),
            ("params", "right"),
            ("bytes", "right"),
            ("time", "right"),
            ("peak RSS", "right"),
            ("max abs diff", "right"),
            ("what it did", "left"),
        ]:
            table.add_column(col, justify=just)
        for r in self.records:
            label = r.name if r.iteration == 0 else f"{r.name} (round {r.iteration + 1})"
            diff = "-"
            if r.vs_original is not None:
                mark = "" if r.verified in (None, True) else " [red]FAIL[/red]"
                diff = f"{r.vs_original.max_abs:.2e}{mark}"
            table.add_row(
                label,
                "yes" if r.modified else "",
                _delta(r.before.get("nodes"), r.after.get("nodes")),
                _delta(r.before.get("params"), r.after.get("params")),
                _delta(r.before.get("param_bytes"), r.after.get("param_bytes"), human=True),
                f"{r.seconds * 1000:.0f} ms",
                _human_bytes(r.memory["peak_rss"]) if r.memory and r.memory.get("peak_rss") else "-",
                diff,
                _what(r.stats),
            )
        console.print(table)
        for line in self.lossy_notes():
            console.print(line, markup=False, highlight=False)
        if self.failed_pass:
            console.print(f"[red]first failing pass: {self.failed_pass}[/red]: {self.failure}")

    def lossy_notes(self) -> list[str]:
        """``"pass: note"`` for every note of a lossy pass: what a user must read to trust the result
        (the opset upgrade, the accuracy budget's measure and outcome, what stayed float and why). The
        lossless passes' notes (rules not applied, ...) stay in the JSON report."""
        return [f"{r.name}: {n}" for r in self.records if not r.lossless for n in r.stats.get("notes") or []]


def _delta(a: int | None, b: int | None, human: bool = False) -> str:
    if a is None or b is None:
        return "-"
    fmt = _human_bytes if human else (lambda v: f"{v:,}")
    return fmt(b) if a == b else f"{fmt(a)} → {fmt(b)}"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _what(stats: dict[str, Any]) -> str:
    counts = stats.get("counts") or {}
    parts = [f"{k} ×{v}" for k, v in counts.items() if v]
    skipped = stats.get("skipped") or []
    if skipped:
        parts.append(f"left {len(skipped)} alone")
    text = ", ".join(parts)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


@dataclasses.dataclass
class PipelineResult(StatsPassResult):
    """Result of :meth:`Pipeline.run`: the model, whether anything changed, and the report."""

    report: Report | None = None


class Pipeline(ir.passes.InPlacePass):
    """An ordered list of passes run with instruments; itself an ``onnx_ir`` pass.

    Args:
        passes: pass instances (ours or any ``onnx_ir.passes.PassBase``), :class:`PassSpec`, or
            a pipeline string such as ``"O1,prune-channels(ratio=0.3)"``.
        context: shared :class:`PassContext` handed to every pass.
        verify: compare outputs after every modifying pass (see module docstring).
        verify_samples: how many input samples verification runs (calibration data first, else
            seeded random inputs).
        fixed_point: repeat the lossless passes until nothing changes.
        reproducer_dir: where to write the failing pass's input model and replay command.
        on_pass: callback ``(record)`` after each pass (progress display).
    """

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase | PassSpec | str] | str,
        *,
        context: PassContext | None = None,
        verify: bool = False,
        verify_samples: int = 4,
        fixed_point: bool = False,
        max_iterations: int = 4,
        reproducer_dir: str | pathlib.Path | None = None,
        on_pass: Callable[[PassRecord], None] | None = None,
    ) -> None:
        self.context = context or PassContext()
        specs: list[ir.passes.PassBase | PassSpec] = []
        for item in [passes] if isinstance(passes, str) else passes:
            if isinstance(item, str):
                specs.extend(parse_pipeline(item))
            else:
                specs.append(item)
        self.passes: list[ir.passes.PassBase] = [
            create_pass(s.name, s.options, self.context) if isinstance(s, PassSpec) else s for s in specs
        ]
        for p in self.passes:
            if hasattr(p, "context") and not isinstance(p, Pipeline):
                p.context = self.context
        self.verify = verify
        self.verify_samples = verify_samples
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.reproducer_dir = pathlib.Path(reproducer_dir) if reproducer_dir else None
        self.on_pass = on_pass

    @classmethod
    def from_config(cls, config: PipelineConfig, **kwargs: Any) -> "Pipeline":
        """Build from a :class:`PipelineConfig` (file form); calibration data is loaded here."""
        from onnxforge.runtime import data as calibration

        context = kwargs.pop("context", None)
        if context is None:
            data = calibration.load(config.calibration_data) if config.calibration_data else None
            context = config.context(data)
        kwargs.setdefault("verify", config.verify)
        kwargs.setdefault("fixed_point", config.fixed_point)
        kwargs.setdefault("max_iterations", config.max_iterations)
        return cls(config.passes, context=context, **kwargs)

    def spec_string(self) -> str:
        return format_pipeline([_spec_of(p) for p in self.passes])

    # ------------------------------------------------------------------ running

    def call(self, model: ir.Model) -> PipelineResult:
        return self.run(model)

    def run(self, model: ir.Model) -> PipelineResult:
        from onnxforge.ir.summary import quick_stats

        start = time.perf_counter()
        report = Report(pipeline=self.spec_string(), target=self.context.target, before=quick_stats(model))
        checker = _Verifier(model, self.context, self.verify_samples) if self.verify else None
        any_modified = False
        # The teacher of data-driven passes (reconstruct) is the model just before the first lossy pass:
        # lossless passes keep its function, and it keeps the structure the student still has (e.g.
        # BatchNorm already folded into the Conv when O1 ran first). A user-given teacher wins. It is
        # set for this run only, so the pipeline stays re-entrant.
        user_reference = self.context.reference_model
        teacher_taken = user_reference is not None

        rounds = [self.passes]
        for _ in range(1, self.max_iterations if self.fixed_point else 1):
            rounds.append([p for p in self.passes if getattr(p, "lossless", True)])
        try:
            for iteration, passes in enumerate(rounds):
                round_modified = False
                for p in passes:
                    if not teacher_taken and not getattr(p, "lossless", True):
                        self.context.reference_model = _deep_copy(model)
                        teacher_taken = True
                    record = self._run_one(p, model, iteration, checker, report)
                    round_modified |= record.modified
                    if self.on_pass:
                        self.on_pass(record)
                any_modified |= round_modified
                if iteration > 0 and not round_modified or not passes:
                    break
                if iteration == 0 and not self.fixed_point:
                    break
        finally:
            self.context.reference_model = user_reference
        report.after = quick_stats(model)
        report.seconds = time.perf_counter() - start
        return PipelineResult(model, any_modified, report=report)

    def _run_one(
        self, p: ir.passes.PassBase, model: ir.Model, iteration: int, checker: "_Verifier | None", report: Report
    ) -> PassRecord:
        from onnxforge.ir.summary import quick_stats
        from onnxforge.ir.io import spill_model
        from onnxforge.runtime.memory import PeakMemory

        spec = str(_spec_of(p))
        name = _name_of(p)
        snapshot = _snapshot(model) if self.reproducer_dir is not None else None
        before = quick_stats(model)
        t0 = time.perf_counter()
        try:
            with PeakMemory() as memory:
                result = p(model)
                spill_model(model)  # new large weights go to disk now (no-op unless io.spilling)
        except OnnxforgeError:
            raise
        except ir.passes.PreconditionError as e:
            cause = e.__cause__
            if isinstance(cause, OnnxforgeError):
                raise cause
            raise PassFailedError(f"pass {name!r}: precondition failed: {cause or e}") from e
        except Exception as e:
            report.failed_pass, report.failure = name, f"{type(e).__name__}: {e}"
            where = self._write_reproducer(snapshot, spec, report)
            hint = f"; reproducer in {where}" if where else "; rerun with --debug for the traceback"
            raise PassFailedError(f"pass {name!r} failed: {type(e).__name__}: {e}{hint}") from e
        seconds = time.perf_counter() - t0
        if result.model is not model:
            raise PassFailedError(f"pass {name!r} returned a new model; onnxforge pipelines run passes in place")
        stats = result.stats.to_dict() if isinstance(result, StatsPassResult) else {}
        record = PassRecord(
            name=name,
            spec=spec,
            iteration=iteration,
            lossless=bool(getattr(p, "lossless", True)),
            modified=bool(result.modified),
            seconds=seconds,
            before=before,
            after=quick_stats(model),
            stats=stats,
            memory=memory.to_dict(),
        )
        report.records.append(record)
        if record.modified:
            # Cheap (one walk over the nodes), so always on: a dangling input, a cycle or a
            # duplicate name is blamed on the pass that made it, not found at save time.
            from onnxforge.ir.validate import MalformedModelError, check_structure

            try:
                check_structure(model)
            except MalformedModelError as e:
                report.failed_pass, report.failure = name, str(e)
                where = self._write_reproducer(snapshot, spec, report)
                hint = f"; reproducer in {where}" if where else ""
                raise PassFailedError(f"pass {name!r} left an invalid model: {e}{hint}") from None
        if checker is not None and record.modified:
            rtol = LOSSLESS_RTOL if record.lossless else float(getattr(p, "tolerance", LOSSLESS_RTOL))
            record.tolerance = rtol
            ok, vs_prev, vs_orig, what, detail = checker.check(model, rtol, record.lossless)
            record.vs_previous, record.vs_original, record.verified = vs_prev, vs_orig, ok
            if not ok:
                report.failed_pass = name
                report.failure = detail
                where = self._write_reproducer(checker.previous_bytes_before_check, spec, report)
                hint = f"; reproducer in {where}" if where else ""
                raise VerificationError(f"pass {name!r} {what}: {detail}{hint}")
        return record

    def _write_reproducer(self, model_bytes: bytes | None, spec: str, report: Report) -> str | None:
        if self.reproducer_dir is None or model_bytes is None:
            return None
        from onnxforge.atomic import atomic_write_bytes

        d = self.reproducer_dir
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "input.onnx", model_bytes)
        atomic_write_bytes(d / "pipeline.txt", (spec + "\n").encode())
        command = f"onnxforge optimize input.onnx --passes '{spec}' --verify -o output.onnx\n"
        atomic_write_bytes(d / "replay.sh", ("#!/bin/sh\ncd \"$(dirname \"$0\")\"\n" + command).encode())
        report.reproducer = str(d)
        return str(d)


def _deep_copy(model: ir.Model) -> ir.Model:
    """A copy sharing no tensor with ``model`` (passes may rewrite arrays in place); see
    :func:`onnxforge.ir.io.deep_copy` (external and spilled tensors keep their folder)."""
    from onnxforge.ir.io import deep_copy

    return deep_copy(model)


def _snapshot(model: ir.Model) -> bytes | None:
    from onnxforge.ir.io import model_to_bytes

    try:
        # Inline: onnxruntime cannot resolve external (or spilled) data of a model given as bytes.
        return model_to_bytes(model)
    except Exception:  # e.g. > 2 GB: no reproducer, but the run goes on
        return None


def _name_of(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", "") or type(p).__name__


def _spec_of(p: ir.passes.PassBase) -> PassSpec:
    options = {}
    if hasattr(p, "options") and callable(p.options):
        from onnxforge.passes.base import option_specs

        defaults = {k: v.default for k, v in option_specs(type(p)).items()}
        options = {k: v for k, v in p.options().items() if defaults.get(k, object()) != v}
    return PassSpec(_name_of(p), options)


class _Verifier:
    """Runs the model after each modifying pass on fixed sample inputs and compares outputs by name."""

    def __init__(self, model: ir.Model, context: PassContext, samples: int) -> None:
        self.feeds = _sample_feeds(model, context, samples)
        self.previous_bytes_before_check = _snapshot(model)
        self.original = self._outputs_from_bytes(self.previous_bytes_before_check)
        if self.original.new_inputs or self.original.dropped_inputs:  # never verify against nothing
            raise VerificationError(
                f"verification inputs do not match the model: missing {self.original.new_inputs}, "
                f"unknown {self.original.dropped_inputs}"
            )
        self.previous = self.original

    def _outputs_from_bytes(self, data: bytes | None) -> _Outputs:
        from onnxforge.runtime.session import make_session

        if data is None:
            raise VerificationError("model too large to verify in memory (over 2 GB); run without --verify")
        session = make_session(data, optimize="disable").session
        required = {i.name for i in session.get_inputs()}
        accepted = required | {i.name for i in session.get_overridable_initializers()}
        fed = set(self.feeds[0]) if self.feeds else set()
        names = [o.name for o in session.get_outputs()]
        outputs = []
        if not required - fed and not fed - accepted:
            outputs = [dict(zip(names, session.run(names, feeds))) for feeds in self.feeds]
        dtypes = {o.name: o.type for o in session.get_outputs()}
        return _Outputs(outputs, dtypes, sorted(required - fed), sorted(fed - accepted))

    def check(
        self, model: ir.Model, rtol: float, lossless: bool = True
    ) -> tuple[bool, Fidelity, Fidelity, str, str]:
        """``(ok, vs_previous, vs_original, what went wrong, detail)``."""
        failed = Fidelity(np.inf, np.inf, 0.0)
        data = _snapshot(model)
        try:
            current = self._outputs_from_bytes(data)
        except OnnxforgeError:
            raise
        except Exception as e:
            return False, failed, failed, "broke the model", (
                f"it no longer runs in onnxruntime: {str(e).splitlines()[0]}"
            )
        if current.new_inputs or current.dropped_inputs:
            parts = []
            if current.new_inputs:
                parts.append(f"it now requires input(s) {', '.join(map(repr, current.new_inputs))}")
            if current.dropped_inputs:
                parts.append(f"it no longer accepts input(s) {', '.join(map(repr, current.dropped_inputs))}")
            return False, failed, failed, "changed the model's inputs", "; ".join(parts)
        vs_prev, what, detail = _fidelity(self.previous, current, rtol, lossless)
        try:
            vs_orig = _fidelity(self.original, current, rtol, lossless)[0]
        except Exception:  # pragma: no cover - vs_prev already matched names and shapes
            vs_orig = failed
        ok = detail == ""
        if ok:
            self.previous = current
            self.previous_bytes_before_check = data
        return ok, vs_prev, vs_orig, what, detail


@dataclasses.dataclass
class _Outputs:
    """One model's outputs on the verification feeds: per sample ``{output name: array}``."""

    samples: list[dict[str, np.ndarray]]
    dtypes: dict[str, str]
    new_inputs: list[str] = dataclasses.field(default_factory=list)
    dropped_inputs: list[str] = dataclasses.field(default_factory=list)


def _fidelity(
    reference: _Outputs, candidate: _Outputs, rtol: float, lossless: bool = True
) -> tuple[Fidelity, str, str]:
    """Worst difference over outputs (paired by name), what kind of rule broke and the first broken
    rule ("" if none)."""
    from onnxforge.runtime.compare import OutputMismatchError, compare, tolerance_violation

    failed = Fidelity(np.inf, np.inf, 0.0)
    if not reference.samples:
        return Fidelity(0.0, 0.0, 1.0), "", ""
    try:
        result = compare(reference.samples, candidate.samples)
    except OutputMismatchError as e:
        return failed, "changed the model's outputs", str(e)
    fidelity = Fidelity(result.max_abs, result.max_rel, result.cosine)
    if lossless:
        changed = [n for n, t in reference.dtypes.items() if candidate.dtypes.get(n, t) != t]
        if changed:
            n = changed[0]
            return fidelity, "changed the model's outputs", (
                f"output {n!r}: type changed {reference.dtypes[n]} → {candidate.dtypes[n]}"
            )
    violation = tolerance_violation(result, rtol, LOSSLESS_ATOL)
    if violation:
        return fidelity, "changed the outputs beyond tolerance", violation
    return fidelity, "", ""


def _sample_feeds(model: ir.Model, context: PassContext, samples: int) -> list[dict[str, np.ndarray]]:
    from onnxforge.runtime import data as calibration

    if context.calibration_data is not None:
        feeds = list(calibration.load(context.calibration_data, model).take(samples))
        if feeds:
            return feeds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(calibration.CalibrationData.synthetic(model, n=samples, seed=context.seed))
