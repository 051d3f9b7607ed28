"""Passes, the pass contract, the registry and the pipeline."""

from onnxforge.passes.base import Pass, PassContext, PassStats, Skip, StatsPassResult
from onnxforge.passes.registry import available_passes, create_pass, load_plugin, register_pass

__all__ = [
    "Pass",
    "PassContext",
    "PassStats",
    "Skip",
    "StatsPassResult",
    "available_passes",
    "create_pass",
    "load_plugin",
    "register_pass",
]
