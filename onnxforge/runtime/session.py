"""onnxruntime sessions with provider fallback, and a validated ``run``.

``make_session`` tries the requested providers in order. A provider is skipped (with the reason
recorded and a warning) when this onnxruntime build does not offer it, when creating the session
with it raises (missing TensorRT/cuDNN libraries, unsupported op), or when onnxruntime silently
drops it (``session.get_providers()`` does not start with it). CPU is always the last resort
unless ``strict=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxforge.errors import ModelLoadError, ProviderError
from onnxforge.runtime._model import ModelLike, OrtSource, check_feeds, session_input_specs
from onnxforge.runtime.providers import (
    CPU,
    CPUOptions,
    ProviderOptions,
    available_providers,
    normalize_provider_options,
    provider_name,
    short_name,
)

OPTIMIZE_LEVELS = ("disable", "basic", "extended", "all")


class ProviderFallbackWarning(UserWarning):
    """A requested execution provider was not used; the message says why."""


@dataclass
class SessionInfo:
    """A created session and how it came to be.

    ``providers_used``: what ``session.get_providers()`` reports (onnxruntime names, in priority
    order). ``fallbacks``: ``(provider, reason)`` for every requested provider that was not used.
    """

    session: Any
    providers_used: list[str]
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        """The primary provider that runs the model (the first of ``providers_used``)."""
        return self.providers_used[0] if self.providers_used else CPU

    def run(self, feeds: Mapping[str, Any], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return run(self, feeds, output_names)


def _optimization_level(optimize: str | bool):
    import onnxruntime as ort

    if optimize is True:
        optimize = "all"
    elif optimize is False or optimize is None:
        optimize = "disable"
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimize not in levels:
        raise ProviderError(f"optimize must be one of {list(OPTIMIZE_LEVELS)}, got {optimize!r}")
    return levels[optimize]


def session_options(
    *,
    threads: int | None = None,
    optimize: str | bool = "disable",
    cpu_options: CPUOptions | None = None,
    extra: Mapping[str, Any] | None = None,
):
    """``onnxruntime.SessionOptions`` for our settings (quiet logging)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = _optimization_level(optimize)
    opts.log_severity_level = 3
    settings: dict[str, Any] = dict(cpu_options.session_settings()) if cpu_options is not None else {}
    if threads is not None:
        if not isinstance(threads, int) or threads < 0:
            raise ProviderError(f"threads must be a non-negative integer (0 = onnxruntime decides), got {threads!r}")
        current = settings.get("intra_op_num_threads")
        if current is not None and current != threads:
            raise ProviderError(
                f"threads={threads} conflicts with the CPU option intra_op_threads={current}; give one"
            )
        settings["intra_op_num_threads"] = threads
    settings.update(extra or {})
    for key, value in settings.items():
        setattr(opts, key, value)
    return opts


def make_session(
    model: ModelLike,
    providers: Sequence[str] = ("cpu",),
    *,
    threads: int | None = None,
    optimize: str | bool = "disable",
    provider_options: Mapping[str, Mapping[str, Any] | ProviderOptions] | Sequence[ProviderOptions] | None = None,
    session_factory: Callable[..., Any] | None = None,
    available: Sequence[str] | None = None,
    strict: bool = False,
) -> SessionInfo:
    """Create an ``onnxruntime.InferenceSession`` for ``model``, falling back down ``providers``.

    Args:
        model: ``onnx_ir.Model``, ``onnx.ModelProto``, bytes, or a path (use a path for models
            with external data / over 2 GB).
        providers: ordered preference, short (``"tensorrt"``) or full onnxruntime names. CPU is
            appended as the last resort unless ``strict``.
        threads: intra-op thread count (``None``: onnxruntime's default).
        optimize: onnxruntime graph optimization: ``"disable"``, ``"basic"``, ``"extended"``,
            ``"all"``.
        provider_options: ``{provider: dict or TensorRTOptions/CUDAOptions/CPUOptions}``; dicts
            are validated by :func:`~onnxforge.runtime.providers.parse_provider_options`.
        session_factory: called as ``session_factory(model, sess_options=..., providers=[names],
            provider_options=[dicts])`` (defaults to ``onnxruntime.InferenceSession``).
        available: providers this build offers (defaults to
            ``onnxruntime.get_available_providers()``).
        strict: do not append CPU; raise if no requested provider works.

    Raises:
        ProviderError: no provider could create a session (every reason is in the message), or
            invalid options.
    """
    import onnxruntime as ort

    if isinstance(providers, str):
        providers = (providers,)
    chain: list[str] = []
    for p in providers:
        full = provider_name(p)
        if full not in chain:
            chain.append(full)
    if not strict and CPU not in chain:
        chain.append(CPU)
    if not chain:
        raise ProviderError("no execution provider requested")
    options = normalize_provider_options(provider_options)
    unused = [name for name in options if name not in chain]
    if unused:
        raise ProviderError(
            f"options given for {[short_name(n) for n in unused]} which are not among the providers {[short_name(n) for n in chain]}"
        )
    cpu_options = options.get(CPU)
    sess_options = session_options(
        threads=threads, optimize=optimize, cpu_options=cpu_options if isinstance(cpu_options, CPUOptions) else None
    )
    factory = session_factory or ort.InferenceSession
    offered = set(available_providers() if available is None else (provider_name(a) for a in available))

    fallbacks: list[tuple[str, str]] = []

    def fall_back(provider: str, reason: str) -> None:
        fallbacks.append((provider, reason))
        warnings.warn(
            f"execution provider {short_name(provider)} not used: {reason}",
            ProviderFallbackWarning,
            stacklevel=3,
        )

    candidates = []
    for name in chain:
        if name in offered or name == CPU:  # CPU is in every build
            candidates.append(name)
        else:
            fall_back(name, f"not available in this onnxruntime build (available: {sorted(offered)})")

    with OrtSource(model) as source:
        i = 0
        while i < len(candidates):
            attempt = candidates[i:]
            try:
                session = factory(
                    source.arg,
                    sess_options=sess_options,
                    providers=list(attempt),
                    provider_options=[options[n].to_ort() if n in options else {} for n in attempt],
                )
            except Exception as exc:  # onnxruntime raises plain RuntimeError / Fail / EPFail
                if _is_model_error(exc):
                    raise ModelLoadError(f"onnxruntime cannot load the model: {_one_line(exc)}") from exc
                fall_back(attempt[0], f"session creation failed: {_one_line(exc)}")
                i += 1
                continue
            used = list(session.get_providers())
            # onnxruntime may drop a provider it could not load (e.g. missing libcudnn) and carry on
            # with the next one: report each dropped one.
            while i < len(candidates) and (not used or used[0] != candidates[i]):
                if candidates[i] in used:
                    break
                fall_back(
                    candidates[i],
                    "onnxruntime dropped it while creating the session (its libraries failed to load or "
                    "it is not usable on this machine)",
                )
                i += 1
            if i >= len(candidates):
                break
            return SessionInfo(session, used, fallbacks, list(chain))
    reasons = "; ".join(f"{short_name(p)}: {r}" for p, r in fallbacks)
    raise ProviderError(f"no execution provider could create a session ({reasons})")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _is_model_error(exc: BaseException) -> bool:
    """Errors that would fail on every provider (a broken model): do not mask them as fallbacks."""
    text = str(exc)
    markers = (
        "INVALID_PROTOBUF",
        "INVALID_GRAPH",
        "NO_SUCHFILE",
        "Load model from",
        "ModelProto does not have",
        "External data path",
    )
    return any(m in text for m in markers) and "ExecutionProvider" not in text


def run(
    model_or_session: ModelLike | SessionInfo | Any,
    feeds: Mapping[str, Any],
    output_names: Sequence[str] | None = None,
    *,
    providers: Sequence[str] = ("cpu",),
    optimize: str | bool = "disable",
) -> dict[str, np.ndarray]:
    """Run once and return ``{output name: array}``.

    ``model_or_session``: a :class:`SessionInfo`, an ``onnxruntime.InferenceSession`` or a model
    (a session is created with ``providers``/``optimize``). Feeds are validated against the model's
    inputs first: a missing or unknown name, a wrong rank, a wrong fixed dimension or an
    incompatible dtype is a :class:`~onnxforge.errors.CalibrationDataError` naming the input.
    """
    if isinstance(model_or_session, SessionInfo):
        session = model_or_session.session
    elif hasattr(model_or_session, "get_inputs") and hasattr(model_or_session, "run"):
        session = model_or_session
    else:
        session = make_session(model_or_session, providers, optimize=optimize).session
    checked = check_feeds(feeds, session_input_specs(session))
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    outputs = session.run(names, checked)
    return dict(zip(names, outputs))
