"""onnxforge.ir.graph: constants, uses, traversal (If subgraphs, functions), edits."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxforge.ir import graph as G
from onnxforge.ir import io
from onnxforge.testing.numerics import run

import torch


class SharedCond(torch.nn.Module):
    """``fc`` applied twice (a shared weight), then ``torch.cond`` whose two branches both read
    ``head``'s weight from the outer scope (an If node with two subgraphs)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(torch.relu(self.fc(x)))
        return torch.cond(
            y.sum() > 0,
            lambda t: self.head(t) * 2,
            lambda t: torch.relu(self.head(t)) - 1,
            (y,),
        )


@pytest.fixture(scope="module")
def exported() -> tuple[bytes, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    module = SharedCond().eval()
    x = torch.randn(2, 4)
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    data = ir.serde.serialize_model(program.model).SerializeToString()
    return data, {program.model.graph.inputs[0].name: x.numpy()}


@pytest.fixture
def model(exported) -> ir.Model:
    return io.load(exported[0])


def _nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in G.all_nodes(model) if n.op_type == op_type]


def _to_constants(model: ir.Model) -> ir.Model:
    """Every initializer becomes a Constant node (as PaddlePaddle's exporter writes weights)."""
    from onnxforge.testing.zoo import constants_as_nodes

    return constants_as_nodes(model)


# --------------------------------------------------------------------------- traversal


def test_all_graphs_includes_if_branches(model):
    graphs = list(G.all_graphs(model))
    assert graphs[0] is model.graph
    assert len(graphs) == 3  # main + then + else
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert len(ifs) == 1
    branches = {ifs[0].attributes["then_branch"].value, ifs[0].attributes["else_branch"].value}
    assert branches == set(graphs[1:])
    ops = [n.op_type for n in G.all_nodes(model)]
    assert "If" in ops and "Relu" in ops and ops.count("Gemm") >= 4  # 2 in main, 1 per branch


def test_all_graphs_includes_function_bodies_and_their_subgraphs():
    inner = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["b"])], "inner", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])]
    )
    other = helper.make_graph(
        [helper.make_node("Abs", ["a"], ["b"])], "other", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])]
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("local", 1)]
    body = [helper.make_node("If", ["c"], ["o"], then_branch=inner, else_branch=other)]
    function = helper.make_function("local", "F", ["c", "a"], ["o"], body, opsets)
    g = helper.make_graph(
        [helper.make_node("F", ["c", "a"], ["y"], domain="local")],
        "main",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    m = io.load(helper.make_model(g, opset_imports=opsets, functions=[function], ir_version=10))
    graphs = list(G.all_graphs(m))
    assert len(graphs) == 4  # main, function body, its two branches
    assert sorted(n.op_type for n in G.all_nodes(m)) == ["Abs", "F", "If", "Neg"]


def test_iter_tensors_covers_subgraphs_and_constant_nodes(model):
    names = {tensor.name for _g, _o, _a, tensor in G.iter_tensors(model)}
    assert {"fc.weight", "fc.bias", "head.weight", "head.bias"} <= names
    constants = _to_constants(model)
    owners = [(type(owner).__name__, attr) for _g, owner, attr, _t in G.iter_tensors(constants)]
    assert owners and all(kind == "Node" and attr == "value" for kind, attr in owners)


# --------------------------------------------------------------------------- constants


def test_const_value_of_initializer(model):
    weight = model.graph.initializers["fc.weight"]
    np.testing.assert_array_equal(G.const_value(weight), weight.const_value.numpy())
    assert G.const_value(model.graph.inputs[0]) is None
    assert G.const_value(None) is None
    relu = _nodes(model, "Relu")[0]
    assert G.const_value(relu.outputs[0]) is None


def test_const_value_finds_constant_node_weights(model, exported):
    data, feeds = exported
    constants = _to_constants(model)
    assert not constants.graph.initializers
    gemm = next(n for n in constants.graph if n.op_type == "Gemm")
    w = G.const_value(gemm.inputs[1])
    assert w is not None
    np.testing.assert_array_equal(w, model.graph.initializers["fc.weight"].const_value.numpy())
    assert gemm.inputs[1].producer().op_type == "Constant"
    # The converted model still computes the same thing.
    np.testing.assert_allclose(run(constants, feeds)[0], run(data, feeds)[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("attr", "value", "expected"),
    [
        ("value_float", 1.5, np.float32(1.5)),
        ("value_floats", [1.0, 2.0], np.array([1.0, 2.0], np.float32)),
        ("value_int", 3, np.int64(3)),
        ("value_ints", [4, 5, 6], np.array([4, 5, 6], np.int64)),
        ("value", helper.make_tensor("t", TensorProto.FLOAT, [2, 2], [1, 2, 3, 4]), np.array([[1, 2], [3, 4]], np.float32)),
    ],
)
def test_const_value_of_every_constant_attribute(attr, value, expected):
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], **{attr: value}), helper.make_node("Identity", ["k"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
    )
    m = io.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    identity = next(n for n in m.graph if n.op_type == "Identity")
    got = G.const_value(identity.inputs[0])
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_initializer_that_is_also_an_input_is_not_constant():
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("w", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2], [1, 2])],
    )
    m = io.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert G.const_value(m.graph.initializers["w"]) is None


# --------------------------------------------------------------------------- uses


def test_consumers_and_is_shared(model):
    fc_w = model.graph.initializers["fc.weight"]
    assert len(G.consumers(fc_w)) == 2 and G.is_shared(fc_w)
    # head.weight is read by one Gemm in each If branch (outer-scope capture).
    head_w = model.graph.initializers["head.weight"]
    readers = G.consumers(head_w)
    assert len(readers) == 2 and all(r.graph is not model.graph for r in readers)
    assert G.is_shared(head_w)
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert len(G.consumers(relu.outputs[0])) == 1 and not G.is_shared(relu.outputs[0])


def test_node_reading_a_value_twice_counts_once():
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    m = io.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    x = m.graph.inputs[0]
    assert len(G.consumers(x)) == 1 and not G.is_shared(x)


def test_graph_output_read_by_a_node_is_shared():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    m = io.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    r = m.graph.node(0).outputs[0]
    assert G.is_graph_output(r) and G.is_shared(r)
    assert G.graph_output_values(m.graph) == list(m.graph.outputs)


# --------------------------------------------------------------------------- replace_all_uses


def test_replace_all_uses_keeps_output_name_and_results(model, exported):
    """Remove the trailing ``* 2`` of the then-branch: the Gemm output takes the branch output's name."""
    _data, feeds = exported
    branch = next(g for g in G.all_graphs(model) if any(n.op_type == "Mul" for n in g))
    mul = next(n for n in branch if n.op_type == "Mul")
    out = mul.outputs[0]
    assert G.is_graph_output(out)
    name = out.name
    G.replace_all_uses(out, mul.inputs[0])
    branch.remove(mul, safe=True)
    assert branch.outputs[-1].name == name
    assert branch.outputs[-1].producer().op_type == "Gemm"
    onnx.checker.check_model(io.model_to_proto(model), full_check=True)
    # Changes the numbers (no * 2 any more) but the model runs with the same interface.
    assert len(run(io.model_to_bytes(model), feeds)) == 1


def test_replace_main_output_by_graph_input_inserts_identity():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    m = io.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    relu = m.graph.node(0)
    G.replace_all_uses(relu.outputs[0], m.graph.inputs[0])
    m.graph.remove(relu, safe=True)
    assert [n.op_type for n in m.graph] == ["Identity"]
    assert m.graph.outputs[0].name == "y" and m.graph.inputs[0].name == "x"
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(run(io.model_to_bytes(m), {"x": x})[0], x)


def test_replace_inner_value_rewires_consumers(model, exported):
    data, feeds = exported
    # Drop the first Relu (between the two fc Gemms): the second Gemm reads the first directly.
    relu = next(n for n in model.graph if n.op_type == "Relu")
    G.replace_all_uses(relu.outputs[0], relu.inputs[0])
    model.graph.remove(relu, safe=True)
    assert not any(n.op_type == "Relu" for n in model.graph)
    assert len(run(io.model_to_bytes(model), feeds)) == 1


# --------------------------------------------------------------------------- names and edits


def test_unique_name_and_make_initializer(model):
    assert G.unique_name(model.graph, "fresh") == "fresh"
    assert G.unique_name(model.graph, "fc.weight") == "fc.weight_1"
    taken: set[str] = set()
    assert [G.unique_name(model.graph, "k", taken=taken) for _ in range(3)] == ["k", "k_1", "k_2"]
    value = G.make_initializer(model.graph, "fc.weight", np.ones((2, 3), np.float32))
    assert value.name == "fc.weight_1"
    assert model.graph.initializers["fc.weight_1"] is value
    assert value.dtype == ir.DataType.FLOAT and list(value.shape) == [2, 3]
    again = G.make_initializer(model.graph, "fc.weight", np.zeros(1, np.int64))
    assert again.name == "fc.weight_2" and again.dtype == ir.DataType.INT64
    # Names used inside the If branches count too.
    branch_output = next(g for g in G.all_graphs(model) if g is not model.graph).outputs[0].name
    assert G.unique_name(model.graph, branch_output) != branch_output


def test_opset_version_and_node_attr(model):
    assert G.opset_version(model) == G.opset_version(model, "ai.onnx") == model.opset_imports[""]
    assert G.opset_version(model, "com.microsoft") is None
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert G.node_attr(gemm, "transB", 0) == 1
    assert G.node_attr(gemm, "nonexistent", "dflt") == "dflt"
    if_node = next(n for n in model.graph if n.op_type == "If")
    assert isinstance(G.node_attr(if_node, "then_branch"), ir.Graph)
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("t", TensorProto.FLOAT, [1], [2])),
         helper.make_node("Transpose", ["k"], ["y"], perm=[0])],
        "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    m = io.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert G.node_attr(m.graph.node(1), "perm") == [0]
    np.testing.assert_array_equal(G.node_attr(m.graph.node(0), "value"), [2.0])
