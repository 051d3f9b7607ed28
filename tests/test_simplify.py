"""simplify: exporter shape idioms and no-ops collapse; outputs do not change."""

from __future__ import annotations

import pytest

from onnxforge.passes import create_pass
from onnxforge.testing import numerics

import torch


class FlattenHead(torch.nn.Module):
    """``x.view(x.size(0), -1)`` before a Linear: the exporter computes the shape at run time."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.size(0), -1))


@pytest.fixture(scope="module")
def flatten_model():
    import onnxforge

    torch.manual_seed(0)
    return onnxforge.export(FlattenHead().eval(), (torch.randn(2, 3, 6, 6),))


def _copy(model):
    import onnx_ir as ir

    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def test_runtime_shape_arithmetic_becomes_a_constant_shape(flatten_model):
    model = _copy(flatten_model)
    create_pass("fold-constants")(model)
    shape_ops_before = numerics.op_count(model, "Shape")
    assert shape_ops_before >= 1, "the export should compute the flatten shape at run time"
    result = create_pass("simplify")(model)
    assert result.modified
    assert result.stats.counts["MaterializeReshapeShape"] >= 1
    assert numerics.op_count(model, "Shape") == 0
    assert numerics.op_count(model, "Constant") == 0  # the new shape is stored as an initializer
    for batch in (1, 3):
        feeds = numerics.random_inputs(flatten_model, seed=batch, dim_values={"batch": batch})
        numerics.assert_outputs_close(flatten_model, model, feeds, rtol=0, atol=0)


def test_optional_zero_bias_is_removed(flatten_model):
    model = _copy(flatten_model)
    create_pass("fold-constants")(model)
    result = create_pass("simplify")(model)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert len(conv.inputs) == 2, "the exporter's all-zero bias of a bias-free Conv is dropped"
    assert result.stats.counts.get("RemoveOptionalBiasFromConv", 0) == 1


def test_simplify_is_idempotent(flatten_model):
    model = _copy(flatten_model)
    create_pass("fold-constants")(model)
    create_pass("simplify")(model)
    assert create_pass("simplify")(model).modified is False


def test_encoder_simplifies_under_both_exporters(zoo_model):
    for dynamo in (True, False):
        original = zoo_model("bert_encoder", opset=18 if dynamo else 13, dynamo=dynamo)
        model = zoo_model("bert_encoder", opset=18 if dynamo else 13, dynamo=dynamo)
        create_pass("fold-constants")(model)
        before = len(list(model.graph))
        create_pass("simplify")(model)
        if dynamo:  # the dynamo export writes Reshape/Transpose idioms that collapse
            assert len(list(model.graph)) < before
        for seq in (5, 19):
            feeds = numerics.random_inputs(original, seed=seq, dim_values={"batch": 2, "seq": seq})
            numerics.assert_outputs_close(original, model, feeds)


def test_reshape_materialized_in_an_opset12_model_has_no_allowzero():
    """onnxscript's reshape rule writes ``allowzero=1``, which onnxruntime refuses before opset 14
    (found on ddddocr's opset-12 recognizer, where it broke O1/O2/O3)."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from onnxforge.passes.manager import Pipeline
    from onnxforge.testing.numerics import assert_outputs_close, copy_model

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
        helper.make_node("Unsqueeze", ["d0"], ["d0u"], axes=[0]),
        helper.make_node("Concat", ["d0u", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    original = ir.serde.deserialize_model(proto)
    model = copy_model(original)
    Pipeline("simplify").run(model)
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    assert reshapes and all("allowzero" not in n.attributes for n in reshapes)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert_outputs_close(original, model, {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)})


def test_a_stale_declared_output_shape_is_not_materialized():
    """ddddocr's recognizer declares ``[1, seqlen]`` for a ``(T, 1, C)`` Reshape output; onnxscript's
    materialize rule wrote the declared shape as the constant and changed the output. The computed
    shape has 3 entries, the declaration 2 dims: refused."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from onnxforge.passes.manager import Pipeline
    from onnxforge.testing.numerics import assert_outputs_close, copy_model

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
        helper.make_node("Unsqueeze", ["d0", "axes"], ["d0u"]),
        helper.make_node("Concat", ["d0u", "one", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seqlen"])],  # stale, as exported
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1]), helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])],
    )
    original = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    model = copy_model(original)
    Pipeline("simplify").run(model)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)}
    assert_outputs_close(original, model, feeds, rtol=0, atol=0)
