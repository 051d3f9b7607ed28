"""Imports every built-in pass module so that each registers itself.

A module listed here that is missing (a pass family not written yet) is skipped silently only if it
does not exist; an import error inside an existing module is raised.
"""

from __future__ import annotations

import importlib
import importlib.util

_MODULES = [
    "onnxforge.passes.cleanup",
    "onnxforge.passes.fold",
    "onnxforge.passes.simplify",
    "onnxforge.passes.fuse",
    "onnxforge.passes.quantize",
    "onnxforge.passes.prune",
    "onnxforge.passes.fp16",
    "onnxforge.passes.lowbit",
]

for _name in _MODULES:
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name)
