"""Runtime: execution providers, sessions with fallback, calibration data, activations, bench, compare.

Import the submodules directly (``from onnxforge.runtime.session import make_session``); the most
used names are re-exported here lazily so that importing the package stays cheap. ``bench`` and
``compare`` are submodule names, so their functions are not re-exported (use
``onnxforge.runtime.bench.bench``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_session": "session",
    "run": "session",
    "SessionInfo": "session",
    "ProviderFallbackWarning": "session",
    "select_providers": "providers",
    "provider_name": "providers",
    "parse_provider_options": "providers",
    "TensorRTOptions": "providers",
    "CUDAOptions": "providers",
    "CPUOptions": "providers",
    "CalibrationData": "data",
    "SyntheticDataWarning": "data",
    "load_data": "data",
    "collect": "activations",
    "collect_stats": "activations",
    "bench_interleaved": "bench",
    "BenchResult": "bench",
    "compare_models": "compare",
    "CompareResult": "compare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxforge.runtime' has no attribute {name!r}")
    mod = importlib.import_module(f"onnxforge.runtime.{module}")
    return getattr(mod, "load" if name == "load_data" else name)
