"""Execution providers: short names, typed options, and the ordered preference list.

Short names (``tensorrt``, ``cuda``, ``cpu``, ...) map to onnxruntime's names
(``TensorrtExecutionProvider``, ...); a name that already ends in ``ExecutionProvider`` passes
through unchanged, so plugin providers work too.

Options are dataclasses whose ``to_ort()`` returns exactly the provider-option dictionary that
``onnxruntime.InferenceSession(..., providers=[name], provider_options=[options])`` accepts
(string values, onnxruntime's own key names). CPU settings are not provider options in onnxruntime
but ``SessionOptions`` attributes; every options class therefore also has ``session_settings()``
(``SessionOptions`` attribute -> value), empty for the GPU providers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from onnxforge.errors import ProviderError

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

SHORT_NAMES: dict[str, str] = {
    "tensorrt": TENSORRT,
    "trt": TENSORRT,
    "cuda": CUDA,
    "cpu": CPU,
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "azure": "AzureExecutionProvider",
}
_FULL_TO_SHORT = {full: short for short, full in reversed(list(SHORT_NAMES.items()))}
_SUFFIX = "ExecutionProvider"


def provider_name(name: str) -> str:
    """onnxruntime's name for ``name``: ``"cuda"`` -> ``"CUDAExecutionProvider"``.

    Case-insensitive for short names; ``"CoreML"`` gets the suffix appended; a full name (ending in
    ``ExecutionProvider``) passes through. Anything else is a :class:`ProviderError`.
    """
    if not isinstance(name, str) or not name:
        raise ProviderError(f"provider name must be a non-empty string, got {name!r}")
    if name.endswith(_SUFFIX):
        return name
    full = SHORT_NAMES.get(name.lower())
    if full is not None:
        return full
    for known in SHORT_NAMES.values():
        if known.lower() == (name + _SUFFIX).lower():
            return known
    raise ProviderError(
        f"unknown execution provider {name!r}; use one of {sorted(set(SHORT_NAMES))} "
        f"or onnxruntime's full name (ending in '{_SUFFIX}')"
    )


def short_name(name: str) -> str:
    """The short name of a provider (``"CUDAExecutionProvider"`` -> ``"cuda"``); unknown ones unchanged."""
    full = provider_name(name)
    return _FULL_TO_SHORT.get(full, full)


def available_providers() -> list[str]:
    """What this onnxruntime build reports (``onnxruntime.get_available_providers()``)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_providers(
    preferred: Sequence[str] = ("tensorrt", "cuda", "cpu"),
    available: Iterable[str] | None = None,
) -> list[str]:
    """The preferred providers this build can offer, in order, always ending with CPU.

    ``available`` defaults to ``onnxruntime.get_available_providers()`` (tests inject a list).
    Returns onnxruntime names, without duplicates.
    """
    names = [provider_name(p) for p in preferred]
    avail = set(available_providers() if available is None else (provider_name(a) for a in available))
    chosen: list[str] = []
    for name in names:
        if name in avail and name not in chosen and name != CPU:
            chosen.append(name)
    chosen.append(CPU)
    return chosen


# --- typed options -----------------------------------------------------------------------------


def _b(flag: bool) -> str:
    # onnxruntime parses "True"/"False" (what str() of a Python bool gives); the Python API
    # stringifies every provider-option value, so we hand over strings directly.
    return "True" if flag else "False"


@dataclass
class TensorRTOptions:
    """TensorRT execution-provider options.

    ``engine_cache_dir`` turns the engine cache on (``trt_engine_cache_enable``) and points it
    there; ``timing_cache_dir`` likewise for the timing cache. ``int8_calibration_table`` (a file
    name inside the engine-cache folder, as onnxruntime expects) is only meaningful with ``int8``;
    QDQ models need no table.
    """

    fp16: bool = False
    int8: bool = False
    engine_cache_dir: str | None = None
    timing_cache_dir: str | None = None
    workspace_bytes: int | None = None
    device_id: int = 0
    int8_calibration_table: str | None = None
    int8_use_native_calibration_table: bool = False
    builder_optimization_level: int | None = None
    min_subgraph_size: int | None = None
    cuda_graph: bool = False

    provider = TENSORRT

    def __post_init__(self) -> None:
        _check_device_id(self.device_id, "tensorrt")
        if self.workspace_bytes is not None and (not isinstance(self.workspace_bytes, int) or self.workspace_bytes <= 0):
            raise ProviderError(f"tensorrt: workspace_bytes must be a positive integer, got {self.workspace_bytes!r}")
        if self.int8_calibration_table and not self.int8:
            raise ProviderError(
                "tensorrt: int8_calibration_table is set but int8 is off; enable int8 or drop the table"
            )
        if self.int8_use_native_calibration_table and not self.int8:
            raise ProviderError(
                "tensorrt: int8_use_native_calibration_table needs int8=True"
            )
        if self.int8_use_native_calibration_table and not self.int8_calibration_table:
            raise ProviderError(
                "tensorrt: int8_use_native_calibration_table needs int8_calibration_table (the file name)"
            )
        if self.int8_calibration_table and not self.engine_cache_dir:
            # onnxruntime looks the table up inside trt_engine_cache_path.
            raise ProviderError(
                "tensorrt: int8_calibration_table is read from the engine-cache folder; set engine_cache_dir"
            )
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            raise ProviderError(
                f"tensorrt: builder_optimization_level must be 0..5, got {self.builder_optimization_level}"
            )
        if self.min_subgraph_size is not None and self.min_subgraph_size < 1:
            raise ProviderError(f"tensorrt: min_subgraph_size must be >= 1, got {self.min_subgraph_size}")

    def to_ort(self) -> dict[str, str]:
        opts = {
            "device_id": str(self.device_id),
            "trt_fp16_enable": _b(self.fp16),
            "trt_int8_enable": _b(self.int8),
        }
        if self.int8_calibration_table:
            opts["trt_int8_calibration_table_name"] = self.int8_calibration_table
            opts["trt_int8_use_native_calibration_table"] = _b(self.int8_use_native_calibration_table)
        if self.engine_cache_dir:
            opts["trt_engine_cache_enable"] = "True"
            opts["trt_engine_cache_path"] = os.fspath(self.engine_cache_dir)
        if self.timing_cache_dir:
            opts["trt_timing_cache_enable"] = "True"
            opts["trt_timing_cache_path"] = os.fspath(self.timing_cache_dir)
        if self.workspace_bytes is not None:
            opts["trt_max_workspace_size"] = str(self.workspace_bytes)
        if self.builder_optimization_level is not None:
            opts["trt_builder_optimization_level"] = str(self.builder_optimization_level)
        if self.min_subgraph_size is not None:
            opts["trt_min_subgraph_size"] = str(self.min_subgraph_size)
        if self.cuda_graph:
            opts["trt_cuda_graph_enable"] = "True"
        return opts

    def session_settings(self) -> dict[str, Any]:
        return {}


_CONV_ALGO = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
_ARENA_STRATEGY = ("kNextPowerOfTwo", "kSameAsRequested")


@dataclass
class CUDAOptions:
    """CUDA execution-provider options (``cudnn_conv_algo_search``: EXHAUSTIVE, HEURISTIC or DEFAULT)."""

    device_id: int = 0
    conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    gpu_mem_limit_bytes: int | None = None
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] | None = None
    conv_use_max_workspace: bool | None = None
    copy_in_default_stream: bool | None = None
    cuda_graph: bool = False
    tunable_op: bool = False

    provider = CUDA

    def __post_init__(self) -> None:
        _check_device_id(self.device_id, "cuda")
        if isinstance(self.conv_algo_search, str):
            self.conv_algo_search = self.conv_algo_search.upper()  # type: ignore[assignment]
        if self.conv_algo_search not in _CONV_ALGO:
            raise ProviderError(
                f"cuda: conv_algo_search must be one of {list(_CONV_ALGO)}, got {self.conv_algo_search!r}"
            )
        if self.arena_extend_strategy is not None and self.arena_extend_strategy not in _ARENA_STRATEGY:
            raise ProviderError(
                f"cuda: arena_extend_strategy must be one of {list(_ARENA_STRATEGY)}, got {self.arena_extend_strategy!r}"
            )
        if self.gpu_mem_limit_bytes is not None and self.gpu_mem_limit_bytes <= 0:
            raise ProviderError(f"cuda: gpu_mem_limit_bytes must be positive, got {self.gpu_mem_limit_bytes}")

    def to_ort(self) -> dict[str, str]:
        opts = {"device_id": str(self.device_id), "cudnn_conv_algo_search": self.conv_algo_search}
        if self.gpu_mem_limit_bytes is not None:
            opts["gpu_mem_limit"] = str(self.gpu_mem_limit_bytes)
        if self.arena_extend_strategy is not None:
            opts["arena_extend_strategy"] = self.arena_extend_strategy
        if self.conv_use_max_workspace is not None:
            opts["cudnn_conv_use_max_workspace"] = "1" if self.conv_use_max_workspace else "0"
        if self.copy_in_default_stream is not None:
            opts["do_copy_in_default_stream"] = "1" if self.copy_in_default_stream else "0"
        if self.cuda_graph:
            opts["enable_cuda_graph"] = "1"
        if self.tunable_op:
            opts["tunable_op_enable"] = "1"
        return opts

    def session_settings(self) -> dict[str, Any]:
        return {}


@dataclass
class CPUOptions:
    """CPU settings. onnxruntime takes these as ``SessionOptions`` attributes, not provider options.

    ``execution_mode="parallel"`` runs independent branches concurrently (uses ``inter_op_threads``).
    """

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    arena: bool = True
    execution_mode: Literal["sequential", "parallel"] = "sequential"

    provider = CPU

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ProviderError(f"cpu: {name} must be a non-negative integer (0 = onnxruntime decides), got {value!r}")
        if self.execution_mode not in ("sequential", "parallel"):
            raise ProviderError(
                f"cpu: execution_mode must be 'sequential' or 'parallel', got {self.execution_mode!r}"
            )
        if self.inter_op_threads not in (None, 0, 1) and self.execution_mode == "sequential":
            raise ProviderError(
                "cpu: inter_op_threads only applies with execution_mode='parallel'; set both or neither"
            )

    def to_ort(self) -> dict[str, str]:
        # The CPU provider has no provider options that change anything; see session_settings().
        return {}

    def session_settings(self) -> dict[str, Any]:
        import onnxruntime as ort

        settings: dict[str, Any] = {
            "enable_cpu_mem_arena": bool(self.arena),
            "execution_mode": ort.ExecutionMode.ORT_PARALLEL
            if self.execution_mode == "parallel"
            else ort.ExecutionMode.ORT_SEQUENTIAL,
        }
        if self.intra_op_threads is not None:
            settings["intra_op_num_threads"] = self.intra_op_threads
        if self.inter_op_threads is not None:
            settings["inter_op_num_threads"] = self.inter_op_threads
        return settings


@dataclass
class RawOptions:
    """Options for a provider we have no typed class for: passed through as strings."""

    provider: str
    options: dict[str, str] = field(default_factory=dict)

    def to_ort(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.options.items()}

    def session_settings(self) -> dict[str, Any]:
        return {}


ProviderOptions = Union[TensorRTOptions, CUDAOptions, CPUOptions, RawOptions]
_TYPED: dict[str, type] = {TENSORRT: TensorRTOptions, CUDA: CUDAOptions, CPU: CPUOptions}


def _check_device_id(device_id: Any, who: str) -> None:
    if not isinstance(device_id, int) or isinstance(device_id, bool) or device_id < 0:
        raise ProviderError(f"{who}: device_id must be a non-negative integer, got {device_id!r}")


def _coerce(value: Any, typ: Any, provider: str, key: str) -> Any:
    """Turn a config/CLI value (often a string) into the annotated field type."""
    text = str(typ)
    if value is None:
        return None
    if "bool" in text and "int" not in text:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int,)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ProviderError(f"{provider}: option {key!r} expects true/false, got {value!r}")
    if "int" in text:
        if isinstance(value, bool):
            raise ProviderError(f"{provider}: option {key!r} expects an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ProviderError(f"{provider}: option {key!r} expects an integer, got {value!r}") from None
    if "str" in text or "Literal" in text:
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return value


def parse_provider_options(provider: str, options: Mapping[str, Any] | ProviderOptions | None) -> ProviderOptions:
    """Typed options for ``provider`` from a dict (TOML/CLI/user code) or an options object.

    Keys are the dataclass field names (``fp16``, ``engine_cache_dir``, ...) or, for convenience,
    onnxruntime's own keys (``trt_fp16_enable``, ``cudnn_conv_algo_search``, ...). An unknown key,
    a badly typed value, or a conflicting combination is a :class:`ProviderError`. Providers without
    a typed class get :class:`RawOptions` (values passed through).
    """
    full = provider_name(provider)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        if getattr(options, "provider", None) != full:
            raise ProviderError(
                f"options of type {type(options).__name__} are for {getattr(options, 'provider', '?')}, not {full}"
            )
        return options  # already typed
    cls = _TYPED.get(full)
    if cls is None:
        return RawOptions(full, {str(k): str(v) for k, v in options.items()})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = _ORT_ALIASES.get(full, {})
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        name, value = _alias(aliases, key, value)
        if name not in fields:
            known = sorted(fields) + sorted(k for k in aliases)
            raise ProviderError(
                f"{short_name(full)}: unknown option {key!r}; known options: {', '.join(known)}"
            )
        if name in kwargs and kwargs[name] != value:
            raise ProviderError(f"{short_name(full)}: option {name!r} given twice with different values")
        kwargs[name] = _coerce(value, fields[name].type, short_name(full), key)
    return cls(**kwargs)


def _alias(aliases: Mapping[str, Any], key: str, value: Any) -> tuple[str, Any]:
    rule = aliases.get(key)
    if rule is None:
        return key, value
    if callable(rule):
        return rule(value)
    return rule, value


def _enable_flag(field_name: str, disabled_value: Any = None):
    """onnxruntime's ``*_enable`` key for a cache: enabling without a path is meaningless."""

    def rule(value: Any) -> tuple[str, Any]:
        flag = _coerce(value, "bool", "tensorrt", field_name)
        if flag:
            raise ProviderError(
                f"tensorrt: enabling the cache needs its folder; set {field_name} (it enables the cache)"
            )
        return field_name, disabled_value

    return rule


_ORT_ALIASES: dict[str, dict[str, Any]] = {
    TENSORRT: {
        "trt_fp16_enable": "fp16",
        "trt_int8_enable": "int8",
        "trt_engine_cache_path": "engine_cache_dir",
        "trt_timing_cache_path": "timing_cache_dir",
        "trt_engine_cache_enable": _enable_flag("engine_cache_dir"),
        "trt_timing_cache_enable": _enable_flag("timing_cache_dir"),
        "trt_max_workspace_size": "workspace_bytes",
        "trt_int8_calibration_table_name": "int8_calibration_table",
        "trt_int8_use_native_calibration_table": "int8_use_native_calibration_table",
        "trt_builder_optimization_level": "builder_optimization_level",
        "trt_min_subgraph_size": "min_subgraph_size",
        "trt_cuda_graph_enable": "cuda_graph",
    },
    CUDA: {
        "cudnn_conv_algo_search": "conv_algo_search",
        "gpu_mem_limit": "gpu_mem_limit_bytes",
        "cudnn_conv_use_max_workspace": "conv_use_max_workspace",
        "do_copy_in_default_stream": "copy_in_default_stream",
        "enable_cuda_graph": "cuda_graph",
        "tunable_op_enable": "tunable_op",
    },
    CPU: {
        "intra_op_num_threads": "intra_op_threads",
        "inter_op_num_threads": "inter_op_threads",
        "enable_cpu_mem_arena": "arena",
        "use_arena": "arena",
    },
}


def normalize_provider_options(
    provider_options: Mapping[str, Mapping[str, Any] | ProviderOptions] | Sequence[ProviderOptions] | None,
) -> dict[str, ProviderOptions]:
    """``{provider name (short or full) -> dict or options}`` (or a list of options objects) as
    ``{onnxruntime name -> typed options}``."""
    if not provider_options:
        return {}
    result: dict[str, ProviderOptions] = {}
    if isinstance(provider_options, Mapping):
        items = list(provider_options.items())
    else:
        items = []
        for opts in provider_options:
            if not hasattr(opts, "provider"):
                raise ProviderError(
                    f"provider_options as a list must hold options objects, got {type(opts).__name__}"
                )
            items.append((opts.provider, opts))
    for name, opts in items:
        full = provider_name(name)
        if full in result:
            raise ProviderError(f"options for {short_name(full)} given twice")
        result[full] = parse_provider_options(full, opts)
    return result
