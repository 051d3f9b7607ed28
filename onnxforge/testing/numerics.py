"""Numerical checks used by the test-suite: run two models in onnxruntime and compare.

onnxruntime runs with ``ORT_DISABLE_ALL`` so that what is compared is our graph, not onnxruntime's
own rewrites of it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

_NP_TYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.BOOL: np.bool_,
}


def to_bytes(model: ir.Model | onnx.ModelProto | bytes) -> bytes:
    if isinstance(model, bytes):
        return model
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    return model.SerializeToString()


def copy_model(model: ir.Model) -> ir.Model:
    """An independent deep copy (passes modify models in place)."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def assert_valid_model(model: ir.Model) -> None:
    """``onnx.checker`` (full check) and strict ONNX shape inference both accept ``model``."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def ort_session(model: ir.Model | onnx.ModelProto | bytes, optimize: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    return ort.InferenceSession(to_bytes(model), opts, providers=["CPUExecutionProvider"])


def run(model: ir.Model | onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` on ``feeds`` (onnxruntime CPU, optimizations disabled)."""
    return ort_session(model).run(None, feeds)


def random_inputs(
    model: ir.Model, seed: int = 0, dim_values: dict[str, int] | None = None, default_dim: int = 2
) -> dict[str, np.ndarray]:
    """Random feeds for every graph input; symbolic dims take ``dim_values[name]`` or ``default_dim``.

    Integer inputs (token ids) are drawn from [0, 10).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        shape = []
        for d in value.shape or []:
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append((dim_values or {}).get(str(d), default_dim))
        dtype = _NP_TYPES.get(value.dtype, np.float32)
        if np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) > 0.5
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_named(model: ir.Model | onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on ``feeds`` keyed by output name (onnxruntime CPU, optimizations disabled)."""
    session = ort_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def assert_outputs_close(
    original: ir.Model | onnx.ModelProto | bytes,
    transformed: ir.Model | onnx.ModelProto | bytes,
    feeds: dict[str, np.ndarray],
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> float:
    """Assert the outputs match **by name**: the same output names, shapes, and every value within
    ``rtol`` relative to the output's max magnitude, plus ``atol``.

    Pairing by name (not position) is what catches a pass that drops or renames an output. The
    arithmetic is :func:`onnxforge.runtime.compare.within_tolerance`, the one used by ``--verify``.
    Returns the largest absolute difference seen, so tests can also report it.
    """
    from onnxforge.runtime.compare import abs_diff, within_tolerance

    expected = run_named(original, feeds)
    actual = run_named(transformed, feeds)
    assert list(expected) == list(actual), f"output names {list(expected)} vs {list(actual)}"
    worst = 0.0
    for name, e in expected.items():
        a = actual[name]
        assert e.shape == a.shape, f"output {name!r}: shape {e.shape} vs {a.shape}"
        diff = float(np.max(abs_diff(e, a))) if e.size else 0.0
        scale = float(np.max(np.abs(np.asarray(e, np.float64)))) if e.size else 0.0
        assert within_tolerance(diff, scale, rtol, atol), (
            f"output {name!r}: max abs diff {diff:.3g} exceeds {atol:g} + {rtol:g} * {scale:.3g}"
        )
        worst = max(worst, diff)
    return worst


def op_count(model: ir.Model, op_type: str, domain: str | None = None) -> int:
    """Number of nodes of ``op_type`` in the model, subgraphs included."""
    return sum(
        1
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == op_type and (domain is None or node.domain == domain)
    )
