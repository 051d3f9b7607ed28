"""onnxforge: a model compiler for ONNX."""

__version__ = "0.1.0"
