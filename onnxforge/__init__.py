"""onnxforge: a model compiler for ONNX.

>>> import onnxforge
>>> result = onnxforge.optimize("model.onnx", "O1", verify=True, output="model.opt.onnx")
>>> result.report.render()
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxforge.api import export, optimize
from onnxforge.distill import distill
from onnxforge.errors import OnnxforgeError
from onnxforge.ir.io import load, save
from onnxforge.passes import Pass, PassContext, PassStats, available_passes, create_pass, register_pass
from onnxforge.passes.manager import Pipeline, PipelineResult, Report

__all__ = [
    "OnnxforgeError",
    "Pass",
    "PassContext",
    "PassStats",
    "Pipeline",
    "PipelineResult",
    "Report",
    "available_passes",
    "create_pass",
    "distill",
    "export",
    "load",
    "optimize",
    "register_pass",
    "save",
]
