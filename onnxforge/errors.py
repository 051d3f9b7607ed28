"""Typed exceptions of onnxforge.

Every user mistake (a wrong path, a malformed model, an unknown pass, a bad option value) raises a
subclass of :class:`OnnxforgeError`. The CLI turns these into one line on stderr and a non-zero exit
code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class OnnxforgeError(Exception):
    """Base class of every error that is the user's to fix."""

    exit_code = 2


class ModelLoadError(OnnxforgeError):
    """The model file is missing, unreadable, truncated or not ONNX."""


class UnsafePathError(OnnxforgeError):
    """An external-data location escapes the model's folder (``..``, absolute path, symlink out)."""


class ModelSaveError(OnnxforgeError):
    """The model could not be written (the destination is left untouched)."""


class PipelineSpecError(OnnxforgeError):
    """A pipeline string or config file is malformed."""


class UnknownPassError(PipelineSpecError):
    """A pass name is not registered."""


class PassOptionError(PipelineSpecError):
    """A pass option is unknown or its value has the wrong type."""


class PluginError(OnnxforgeError):
    """A plugin module or entry point could not be loaded."""


class PassFailedError(OnnxforgeError):
    """A pass raised while running; the message names the pass."""

    exit_code = 3


class VerificationError(OnnxforgeError):
    """A pass changed the model's outputs beyond the tolerance; names the first such pass."""

    exit_code = 4


class CalibrationDataError(OnnxforgeError):
    """Calibration or evaluation data is missing or does not match the model's inputs."""


class ProviderError(OnnxforgeError):
    """No requested execution provider could create a session, or its options are invalid."""


class UnsupportedModelError(OnnxforgeError):
    """The model uses something a pass or command cannot handle (names the op or feature)."""


class MissingDependencyError(OnnxforgeError):
    """An optional dependency (torch, optuna, ray, ...) is needed; the message says how to install it."""
