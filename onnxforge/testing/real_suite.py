"""The trained-model suite (issue 11); the code lives in :mod:`onnxforge.testing.real`.

This module is the stable import path: ``from onnxforge.testing.real_suite import SUITE, fetch, load_case``.
"""

from onnxforge.testing.real import SUITE, RealCase, SuiteSpec, cache_root, fetch, load_case

__all__ = ["SUITE", "RealCase", "SuiteSpec", "cache_root", "fetch", "load_case"]
