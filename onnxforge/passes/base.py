"""The pass contract: :class:`Pass`, :class:`PassContext`, and the statistics a pass reports.

A pass is an :class:`onnx_ir.passes.InPlacePass`, so it runs inside any ``onnx_ir`` pass manager and
onnxscript's tooling, and theirs run inside our :class:`~onnxforge.passes.manager.Pipeline`.

Writing one::

    from onnxforge.passes import Pass, PassStats, register_pass

    @register_pass("drop-identity")
    class DropIdentityPass(Pass):
        \"\"\"Remove Identity nodes. Lossless.\"\"\"

        def __init__(self, keep_outputs: bool = True):
            super().__init__()
            self.keep_outputs = keep_outputs

        def run(self, model, stats: PassStats) -> bool:
            ...  # rewrite model.graph in place
            stats.count("removed")
            return True  # whether the model changed

Options are the keyword arguments of ``__init__``; their annotations and defaults are what the
pipeline parser uses to convert ``drop-identity(keep_outputs=false)``. A pass keeps no state between
runs: everything it learns in one run goes into the :class:`PassStats` it is handed.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import inspect
from typing import Any, ClassVar

import onnx_ir as ir

TARGETS = ("cpu", "cuda", "tensorrt", "onnx")
"""Deployment targets: onnxruntime on CPU / CUDA / TensorRT, or plain standard ONNX (no contrib ops)."""


@dataclasses.dataclass
class Skip:
    """A node a pass looked at and left intact, and why."""

    node: str
    op_type: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PassStats:
    """What one run of a pass did: counters, nodes left alone with reasons, free-form notes.

    ``details`` holds structured data for the report (e.g. per-layer errors of a reconstruction).
    """

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def skip(self, node: ir.Node | str, reason: str) -> None:
        if isinstance(node, ir.Node):
            self.skipped.append(Skip(node.name or "<unnamed>", node.op_type, reason))
        else:
            self.skipped.append(Skip(str(node), "", reason))

    def note(self, message: str) -> None:
        self.notes.append(message)

    def merge(self, other: PassStats) -> None:
        self.counts.update(other.counts)
        self.skipped.extend(other.skipped)
        self.notes.extend(other.notes)
        self.details.update(other.details)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
            "details": self.details,
        }


@dataclasses.dataclass
class StatsPassResult(ir.passes.PassResult):
    """A :class:`onnx_ir.passes.PassResult` that also carries the pass's :class:`PassStats`."""

    stats: PassStats = dataclasses.field(default_factory=PassStats)


@dataclasses.dataclass
class PassContext:
    """Shared resources a pipeline hands to every pass (never globals).

    Attributes:
        target: ``cpu``, ``cuda``, ``tensorrt`` (onnxruntime execution providers) or ``onnx``
            (standard ops only, no ``com.microsoft`` contrib ops).
        calibration_data: a :class:`onnxforge.runtime.data.CalibrationData` (or None); used by
            quantization calibration, activation-based pruning importance and reconstruction.
        reference_model: the teacher of data-driven passes (reconstruct). Left None, the pipeline sets
            it for the run to a copy of the model just before its first lossy pass (lossless passes
            keep the function, and the teacher keeps the student's structure); a model given here wins.
        importance: external per-initializer importance scores (e.g. Taylor |w*dL/dw| from torch),
            keyed by initializer name.
        providers: execution providers for passes that measure (latency guard, calibration), short
            (``"cuda"``) or onnxruntime names; the config file's ``providers`` key. Verification always
            runs on CPU with optimizations off (the reference numerics).
        explain: passes that match patterns list near-misses with the reason.
        seed: seed for any randomness (passes are deterministic given the seed).
        options: extra registered settings (see :data:`CONTEXT_OPTION_KEYS`); unknown keys are errors.
    """

    target: str = "cpu"
    calibration_data: Any = None
    reference_model: ir.Model | None = None
    importance: dict[str, Any] | None = None
    providers: tuple[str, ...] = ("cpu",)
    explain: bool = False
    seed: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from onnxforge.errors import PassOptionError

        if self.target not in TARGETS:
            raise PassOptionError(
                f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}"
            )
        if isinstance(self.providers, str):
            self.providers = (self.providers,)
        self.providers = tuple(self.providers)
        if not self.providers:
            raise PassOptionError("providers is empty; give at least one, e.g. ('cpu',)")
        from onnxforge.errors import ProviderError
        from onnxforge.runtime.providers import provider_name

        for name in self.providers:
            try:
                provider_name(name)
            except ProviderError as e:
                raise PassOptionError(f"PassContext providers: {e}") from None
        unknown = set(self.options) - set(CONTEXT_OPTION_KEYS)
        if unknown:
            raise PassOptionError(
                f"unknown context option(s) {sorted(unknown)}; known: {sorted(CONTEXT_OPTION_KEYS)}"
            )


CONTEXT_OPTION_KEYS: dict[str, str] = {
    "num_samples": "cap on calibration samples used by data-driven passes",
    "eval_data": "evaluation data (CalibrationData) for accuracy-aware passes",
    "metric": "callable(outputs, data[, float_outputs]) -> float, higher is better",
    "decisions": "path of quantize-int8's decision record (its own `decisions` option wins)",
}


class Pass(ir.passes.InPlacePass):
    """Base class of onnxforge passes.

    Subclasses implement :meth:`run` and declare options as keyword arguments of ``__init__``.
    ``lossless`` says whether the pass may change outputs beyond fp32 rounding; the verifier uses the
    tight tolerance for lossless passes and the pass's ``tolerance`` (max abs error relative to the
    output's scale) for lossy ones.
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    tolerance: ClassVar[float] = 1e-4

    def __init__(self) -> None:
        self.context = PassContext()

    @abc.abstractmethod
    def run(self, model: ir.Model, stats: PassStats) -> bool:
        """Rewrite ``model`` in place, record what was done in ``stats``, return whether it changed."""

    def call(self, model: ir.Model) -> StatsPassResult:
        stats = PassStats()
        modified = bool(self.run(model, stats))
        return StatsPassResult(model, modified, stats)

    @classmethod
    def option_specs(cls) -> dict[str, inspect.Parameter]:
        """The options this pass takes: ``__init__``'s keyword parameters."""
        return option_specs(cls)

    def options(self) -> dict[str, Any]:
        """Current option values (as stored on ``self`` under the option's name)."""
        return {k: getattr(self, k) for k in option_specs(type(self)) if hasattr(self, k)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def option_specs(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``cls.__init__`` (excluding ``self``, ``*args``, ``**kwargs``)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}
    return {
        name: p
        for name, p in sig.parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def summary_line(doc: str | None) -> str:
    """First sentence/line of a docstring, for ``onnxforge passes``."""
    if not doc:
        return ""
    return inspect.cleandoc(doc).strip().splitlines()[0].strip()
