"""A custom onnxforge pass, registered by name and usable from the CLI.

It removes ``Mul`` nodes that multiply by a constant 1 (exporters leave them behind after scaling
tricks). Lossless: x * 1 == x exactly in IEEE arithmetic.

Use it from the command line, either by importing the module::

    onnxforge --plugin examples/custom_pass/fold_scale_pass.py optimize model.onnx --passes "O1,drop-mul-by-one"

or by installing the small package in this folder, whose ``pyproject.toml`` declares the entry point
``[project.entry-points."onnxforge.passes"] drop-mul-by-one = "fold_scale_pass:DropMulByOnePass"``::

    pip install ./examples/custom_pass
    onnxforge optimize model.onnx --passes "O1,drop-mul-by-one"
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxforge.ir.graph import const_value, is_graph_output
from onnxforge.passes import Pass, PassStats, register_pass


@register_pass("drop-mul-by-one")
class DropMulByOnePass(Pass):
    """Remove ``Mul(x, 1)`` nodes. Lossless."""

    def __init__(self, tolerance_ulps: int = 0):
        super().__init__()
        self.tolerance_ulps = tolerance_ulps

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        changed = False
        for node in list(model.graph):
            if node.op_type != "Mul" or node.domain != "":
                continue
            x, c = node.inputs
            constant = const_value(c)
            if constant is None:
                x, c = c, x
                constant = const_value(c)
            if constant is None or not np.all(constant == 1):
                continue
            out = node.outputs[0]
            if constant.size > 1 or x.shape != out.shape or x.dtype != out.dtype:
                stats.skip(node, "multiplying by a ones tensor would broadcast: shape changes")
                continue
            if is_graph_output(out):
                stats.skip(node, "its output is a graph output")
                continue
            ir.convenience.replace_all_uses_with(out, x)
            model.graph.remove(node, safe=True)
            stats.count("Mul-by-1 removed")
            changed = True
        return changed

