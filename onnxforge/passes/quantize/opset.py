"""Opset upgrade for the quantization passes (per-channel DequantizeLinear needs opset >= 13).

A model the pass leaves float needs nothing of opset 13, so :func:`copy_model` / :func:`restore_model`
let it come back at the opset it came with (an opset-11 export stays loadable by the runtimes it was
made for).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxforge.ir.graph import opset_version
from onnxforge.passes.base import PassStats


def upgrade_opset(model: ir.Model, version: int, stats: PassStats) -> bool:
    """Convert the model to ``version`` in place (onnxscript's version converter); True on success."""
    old = opset_version(model) or 0
    try:
        from onnxscript import version_converter

        # It logs a warning each time it hands the model to onnx's C converter (opset 11 models do):
        # on stderr that reads like a problem, while the outcome goes into the pass's notes below.
        converter_log = logging.getLogger("onnxscript.version_converter")
        level = converter_log.level
        converter_log.setLevel(logging.ERROR)
        try:
            version_converter.convert_version(model, version, fallback=True)
        finally:
            converter_log.setLevel(level)
    except Exception as e:  # the converter refuses some models; the caller falls back to per-tensor
        stats.note(f"opset upgrade {old} -> {version} failed ({type(e).__name__}: {e})")
        return False
    if (opset_version(model) or 0) < version:
        stats.note(f"opset upgrade {old} -> {version} did not take effect")
        return False
    model.ir_version = max(model.ir_version or 0, 7)
    stats.note(f"upgraded opset {old} -> {version}: per-channel DequantizeLinear needs opset >= 13")
    stats.count("opset_upgraded")
    return True


def copy_model(model: ir.Model):
    """``model`` as a ModelProto (external tensors stay references to their files); read back only by
    :func:`restore_model`, so a model that gets quantized pays one serialization, not a round trip."""
    return ir.serde.serialize_model(model)


def restore_model(model: ir.Model, copy) -> None:
    """Make ``model`` what the :func:`copy_model` ``copy`` is, in place (graph, functions, IR version)."""
    restored = ir.serde.deserialize_model(copy)
    model.graph = restored.graph
    model.ir_version = restored.ir_version
    model.functions.clear()
    model.functions.update(restored.functions)
