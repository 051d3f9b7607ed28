"""convert-fp16: float16 weights and compute, sensitive ops and I/O in float32, within 1e-2 of fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import torch

from onnxforge.passes.fp16 import DEFAULT_KEEP_OPS, ConvertFloat16Pass  # noqa: E402
from onnxforge.passes.registry import create_pass  # noqa: E402
from onnxforge.testing import zoo  # noqa: E402
from onnxforge.testing.numerics import op_count, run  # noqa: E402

TOLERANCE = ConvertFloat16Pass.tolerance  # max abs error relative to the output's max magnitude
LARGE = 256  # "large" weights: at least this many elements


# --------------------------------------------------------------------------- models

MODELS = ("mobilenetv3_style", "yolo_style", "bert_encoder")


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.fixture(scope="module")
def models(zoo_model) -> dict[str, ir.Model]:
    return {name: zoo_model(name) for name in MODELS}


def _feeds(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    return zoo.feeds(name, batch=2, seed=seed)


def _relative_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    worst = 0.0
    for e, a in zip(reference, candidate):
        e64, a64 = np.asarray(e, np.float64), np.asarray(a, np.float64)
        worst = max(worst, float(np.max(np.abs(e64 - a64)) / max(np.max(np.abs(e64)), 1e-12)))
    return worst


def _convert(model: ir.Model, **options):
    converted = _copy(model)
    result = ConvertFloat16Pass(**options)(converted)
    return converted, result


def _tiny_model(nodes, inputs, outputs, initializers=(), value_info=()) -> ir.Model:
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(proto)


# --------------------------------------------------------------------------- the specification


@pytest.mark.parametrize("name", MODELS)
def test_fp16_runs_on_cpu_within_tolerance_with_float16_weights(models, name):
    original = models[name]
    converted, result = _convert(original)
    assert result.modified
    onnx.checker.check_model(ir.serde.serialize_model(converted), full_check=True)

    # All large weights are float16; the interface is unchanged (names and float32 types).
    large = [v for v in converted.graph.initializers.values() if v.const_value is not None and v.const_value.size >= LARGE]
    assert len(large) > 5, "test model should have large weights"
    assert all(v.dtype == ir.DataType.FLOAT16 for v in large), [v.name for v in large if v.dtype != ir.DataType.FLOAT16]
    assert [(v.name, v.dtype) for v in converted.graph.inputs] == [(v.name, v.dtype) for v in original.graph.inputs]
    assert [(v.name, v.dtype) for v in converted.graph.outputs] == [(v.name, v.dtype) for v in original.graph.outputs]
    assert result.stats.counts["nodes_fp16"] > 0
    assert result.stats.counts["initializers_fp16"] >= len(large)

    for seed in (0, 1):
        feeds = _feeds(name, seed)
        reference, candidate = run(original, feeds), run(converted, feeds)
        assert all(c.dtype == np.float32 for c in candidate)
        error = _relative_error(reference, candidate)
        assert 0 < error <= TOLERANCE, f"{name}: relative error {error:.3g} (bound {TOLERANCE})"


def test_bert_keeps_softmax_and_layernorm_in_float32(models):
    converted, result = _convert(models["bert_encoder"])
    sensitive = [n for n in converted.graph if n.op_type in ("Softmax", "LayerNormalization")]
    assert sensitive
    for node in sensitive:
        assert node.inputs[0].dtype == ir.DataType.FLOAT, f"{node.op_type} reads {node.inputs[0].dtype}"
        assert node.outputs[0].dtype == ir.DataType.FLOAT
    # ... and every one of them is reported as left alone, with the reason.
    kept = [s for s in result.stats.skipped if s.op_type in ("Softmax", "LayerNormalization")]
    assert len(kept) == len(sensitive)
    assert all("keep_ops" in s.reason for s in kept)
    # Token ids stay int64; MatMuls compute in float16; LayerNorm's scale and bias stay float32.
    assert converted.graph.inputs[0].dtype == ir.DataType.INT64
    matmuls = [n for n in converted.graph if n.op_type == "MatMul"]
    assert matmuls and all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in matmuls)
    ln = next(n for n in converted.graph if n.op_type == "LayerNormalization")
    assert ln.inputs[1].dtype == ir.DataType.FLOAT and ln.inputs[1].is_initializer()


def test_keep_ops_empty_converts_softmax_and_resize_too(models):
    converted, result = _convert(models["bert_encoder"], keep_ops=[])
    for node in converted.graph:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert node.inputs[0].dtype == ir.DataType.FLOAT16
    assert not [s for s in result.stats.skipped if "keep_ops" in s.reason]
    feeds = _feeds("bert_encoder")
    error = _relative_error(run(models["bert_encoder"], feeds), run(converted, feeds))
    assert error <= 5 * TOLERANCE  # looser, but it runs and stays close

    # Resize computes in float16, but its scales input stays float32: the schema fixes tensor(float).
    converted, _ = _convert(models["yolo_style"], keep_ops=[])
    resizes = [n for n in converted.graph if n.op_type == "Resize"]
    assert resizes
    for resize in resizes:
        assert resize.inputs[0].dtype == ir.DataType.FLOAT16
        if len(resize.inputs) > 2 and resize.inputs[2] is not None:
            assert resize.inputs[2].dtype == ir.DataType.FLOAT
    onnx.checker.check_model(ir.serde.serialize_model(converted), full_check=True)
    feeds = _feeds("yolo_style")
    assert _relative_error(run(models["yolo_style"], feeds), run(converted, feeds)) <= TOLERANCE


def test_keep_nodes_by_name(models):
    original = models["mobilenetv3_style"]
    conv = next(n for n in original.graph if n.op_type == "Conv")
    converted, result = _convert(original, keep_nodes=[conv.name])
    kept = next(n for n in converted.graph if n.name == conv.name)
    assert kept.outputs[0].dtype == ir.DataType.FLOAT
    assert all(v.dtype == ir.DataType.FLOAT for v in kept.inputs if v is not None)
    assert any(s.node == conv.name and "keep_nodes" in s.reason for s in result.stats.skipped)
    feeds = _feeds("mobilenetv3_style")
    assert _relative_error(run(original, feeds), run(converted, feeds)) <= TOLERANCE


def test_keep_io_types_false_makes_the_interface_float16(models):
    original = models["mobilenetv3_style"]
    converted, _ = _convert(original, keep_io_types=False)
    assert converted.graph.inputs[0].dtype == ir.DataType.FLOAT16
    assert converted.graph.outputs[0].dtype == ir.DataType.FLOAT16
    feeds = _feeds("mobilenetv3_style")
    out = run(converted, {k: v.astype(np.float16) for k, v in feeds.items()})
    assert out[0].dtype == np.float16
    assert _relative_error(run(original, feeds), out) <= TOLERANCE


def test_second_run_changes_nothing_and_output_is_deterministic(models):
    first, _ = _convert(models["mobilenetv3_style"])
    again = _copy(first)
    result = ConvertFloat16Pass()(again)
    assert not result.modified
    assert op_count(again, "Cast") == op_count(first, "Cast")
    other, _ = _convert(models["mobilenetv3_style"])
    a = ir.serde.serialize_model(first).SerializeToString(deterministic=True)
    b = ir.serde.serialize_model(other).SerializeToString(deterministic=True)
    assert a == b


def test_registered_and_created_from_the_pipeline_text_options():
    instance = create_pass("convert-fp16", {"keep_ops": ["Softmax", "Exp"], "keep_io_types": "false"})
    assert isinstance(instance, ConvertFloat16Pass)
    assert instance.keep_ops == ["Softmax", "Exp"] and instance.keep_io_types is False
    assert not ConvertFloat16Pass.lossless and ConvertFloat16Pass.tolerance == TOLERANCE
    assert "Softmax" in DEFAULT_KEEP_OPS and "Resize" in DEFAULT_KEEP_OPS


def _vi(name, elem, shape):
    return onnx.helper.make_tensor_value_info(name, elem, shape)


def test_out_of_range_weights_are_clamped_not_inf():
    F = onnx.TensorProto.FLOAT
    original = _tiny_model(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Mul", ["h", "s"], ["y"])],
        [_vi("x", F, [2, 4])], [_vi("y", F, [2, 4])],
        [onnx.numpy_helper.from_array(np.full((4, 4), 1e6, np.float32), "w"),
         onnx.numpy_helper.from_array(np.array(1e-6, np.float32), "s")],
        [_vi("h", F, [2, 4])],
    )
    converted, result = _convert(original)
    assert result.stats.counts["weights_clamped"] == 16
    weight = converted.graph.initializers["w"].const_value.numpy()
    assert weight.dtype == np.float16 and np.isfinite(weight).all()
    assert np.abs(weight).max() == np.float16(65504)


def test_subgraph_nodes_are_kept_and_reported():
    F = onnx.TensorProto.FLOAT
    then_g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["h"], ["t"])], "then", [], [_vi("t", F, [2])])
    else_g = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["h"], ["e"])], "else", [], [_vi("e", F, [2])])
    original = _tiny_model(
        [
            onnx.helper.make_node("Mul", ["x", "w"], ["h"], name="mul"),
            onnx.helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
        ],
        [_vi("x", F, [2]), _vi("c", onnx.TensorProto.BOOL, [])], [_vi("y", F, [2])],
        [onnx.numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "w")],
        [_vi("h", F, [2])],
    )
    converted, result = _convert(original)
    assert any(s.op_type == "If" and "subgraph" in s.reason for s in result.stats.skipped)
    mul = next(n for n in converted.graph if n.op_type == "Mul")
    assert mul.outputs[0].dtype == ir.DataType.FLOAT16  # computed in float16, cast up for the If body
    onnx.checker.check_model(ir.serde.serialize_model(converted), full_check=True)
    for c in (True, False):
        feeds = {"x": np.array([1.5, -2.0], np.float32), "c": np.array(c)}
        np.testing.assert_allclose(run(converted, feeds)[0], run(original, feeds)[0], rtol=1e-3)


def test_untyped_values_are_inferred_first():
    F = onnx.TensorProto.FLOAT
    original = _tiny_model(
        [onnx.helper.make_node("Mul", ["x", "w"], ["h"]), onnx.helper.make_node("Softmax", ["h"], ["y"])],
        [_vi("x", F, [2, 3])], [_vi("y", F, [2, 3])],
        [onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "w")],
    )  # no value_info for h
    converted, result = _convert(original)
    mul = next(n for n in converted.graph if n.op_type == "Mul")
    softmax = next(n for n in converted.graph if n.op_type == "Softmax")
    assert mul.outputs[0].dtype == ir.DataType.FLOAT16
    assert softmax.inputs[0].dtype == ir.DataType.FLOAT
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    np.testing.assert_allclose(run(converted, feeds)[0], run(original, feeds)[0], rtol=1e-3)
