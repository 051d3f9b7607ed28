"""Specification of the lossless cleanup passes (onnxforge/passes/cleanup.py).

Each test exports a small torch module (dynamo and TorchScript exporters give different graphs), runs one
pass, checks the graph changed as the pass promises, and checks the outputs did not change (onnxruntime,
optimizations disabled, fp32, rtol 1e-4).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxforge.passes import create_pass
from onnxforge.passes.cleanup import node_count
from onnxforge.testing import zoo
from onnxforge.testing.numerics import assert_outputs_close, random_inputs, run

import torch


# --------------------------------------------------------------------------- export helpers


@functools.lru_cache(maxsize=None)
def _export_bytes(name: str, dynamo: bool, opset: int) -> bytes:
    module, example = MODELS[name]()
    module.eval()
    return zoo.export_raw_bytes(module, example, dynamo=dynamo, opset=opset)


def export(name: str, dynamo: bool = True, opset: int = 18) -> ir.Model:
    """A fresh ir.Model (passes mutate in place) of the named test module.

    With the dynamo exporter this is the combined module :class:`All`, which contains ``name``.
    """
    if dynamo:
        name, opset = "all", 18
    return ir.serde.deserialize_model(onnx.load_from_string(_export_bytes(name, dynamo, opset)))


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def apply(name: str, model: ir.Model, **options):
    p = create_pass(name, options)
    result = p(model)
    return result


def check_same(original: ir.Model, transformed: ir.Model, seed: int = 0) -> float:
    feeds = random_inputs(original, seed=seed, default_dim=3)
    return assert_outputs_close(original, transformed, feeds, rtol=1e-4)


# --------------------------------------------------------------------------- test modules


class DeadBranch(torch.nn.Module):
    """Two heads; the test then drops the second output, so its branch (and weights) are dead."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)
        self.aux = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head(h), self.aux(h)


class Repeated(torch.nn.Module):
    """The same subexpression computed twice, and two equal weight tensors."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 5)
        self.b = torch.nn.Linear(5, 5)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return torch.sigmoid(x) * torch.sigmoid(x) + self.a(x) - self.b(torch.relu(x))


class WithDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 6)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x))).clone()


class ConstMath(torch.nn.Module):
    """Arithmetic on buffers only: a constant folder evaluates it ahead of time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.linspace(-1.0, 1.0, 6))
        self.register_buffer("b", torch.linspace(0.5, 2.0, 6))

    def forward(self, x):
        return x * (self.a * 2.0 + self.b.exp()) + torch.sqrt(self.b)


class SmallCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(y)


class All(torch.nn.Module):
    """Every test module side by side: one dynamo export (seconds each) serves all dynamo tests."""

    def __init__(self):
        super().__init__()
        self.cnn, self.repeated, self.dropout = SmallCnn(), Repeated(), WithDropout()
        self.const, self.dead = ConstMath(), DeadBranch()

    def forward(self, img, x5, x4, x6):
        head, aux = self.dead(x6)
        return self.cnn(img), self.repeated(x5), self.dropout(x4), self.const(x6), head, aux


MODELS = {
    "all": lambda: (
        All(),
        (torch.randn(2, 3, 8, 8), torch.randn(2, 5), torch.randn(2, 4), torch.randn(2, 6)),
    ),
    "dead_branch": lambda: (DeadBranch(), (torch.randn(2, 6),)),
    "repeated": lambda: (Repeated(), (torch.randn(2, 5),)),
    "dropout": lambda: (WithDropout(), (torch.randn(2, 4),)),
    "const_math": lambda: (ConstMath(), (torch.randn(2, 6),)),
    "small_cnn": lambda: (SmallCnn(), (torch.randn(2, 3, 8, 8),)),
}


# --------------------------------------------------------------------------- lift-constants


@pytest.mark.parametrize("dynamo,opset", [(True, 18), (False, 11)])
def test_lift_constants_paddle_style(dynamo, opset):
    original = zoo.constants_as_nodes(export("small_cnn", dynamo, opset))
    assert not original.graph.initializers
    n_const = node_count(original, "Constant")
    assert n_const >= 4
    model = copy(original)
    result = apply("lift-constants", model)
    assert result.modified
    assert node_count(model, "Constant") == 0
    assert result.stats.counts["lifted"] == n_const
    assert any(name.endswith("conv.weight") for name in model.graph.initializers)
    check_same(original, model)
    # idempotent
    assert not apply("lift-constants", model).modified


def test_lift_constants_scalar_attributes_and_graph_output():
    # value_float / value_ints Constants, as the TorchScript exporter writes scalars at opset 11.
    original = export("const_math", dynamo=False, opset=11)
    graph = original.graph
    c1 = ir.node("Constant", [], attributes={"value_float": 3.0})
    c2 = ir.node("Constant", [], attributes={"value_ints": [-1]})
    c3 = ir.node("Constant", [], attributes={"value": ir.tensor(np.ones((2,), np.float32))})
    for c in (c1, c2, c3):
        graph.append(c)
    out = graph.outputs[0]
    mul = ir.node("Mul", [out, c1.outputs[0]])
    reshape = ir.node("Reshape", [mul.outputs[0], c2.outputs[0]])
    graph.append(mul)
    graph.append(reshape)
    reshape.outputs[0].name = "scaled"
    c3.outputs[0].name = "const_out"
    graph.outputs.extend([reshape.outputs[0], c3.outputs[0]])
    n_const = node_count(original, "Constant")

    model = copy(original)
    result = apply("lift-constants", model)
    # Only the Constant that is a graph output stays, and the report says why.
    assert node_count(model, "Constant") == 1
    assert result.stats.counts["lifted"] == n_const - 1
    assert any("graph output" in s.reason for s in result.stats.skipped)
    check_same(original, model)


def test_lift_constants_in_if_subgraph():
    model = _if_model()
    original = copy(model)
    result = apply("lift-constants", model)
    assert result.modified
    assert node_count(model, "Constant") == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    for flag in (True, False):
        feeds["cond"] = np.array(flag)
        assert_outputs_close(original, model, feeds)


def _if_model() -> ir.Model:
    """y = If(cond, then: x * C1 + C2, else: x - C3) with Constant-node weights inside the branches."""
    h = onnx.helper
    TP = onnx.TensorProto

    def const(name, arr):
        return h.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name))

    then_graph = h.make_graph(
        [
            const("c1", np.full((3,), 2.0, np.float32)),
            const("c2", np.arange(3, dtype=np.float32)),
            h.make_node("Mul", ["x", "c1"], ["m"]),
            h.make_node("Add", ["m", "c2"], ["t_out"]),
        ],
        "then",
        [],
        [h.make_tensor_value_info("t_out", TP.FLOAT, None)],
    )
    else_graph = h.make_graph(
        [const("c3", np.full((3,), 0.5, np.float32)), h.make_node("Sub", ["x", "c3"], ["e_id"]),
         h.make_node("Identity", ["e_id"], ["e_out"])],
        "else",
        [],
        [h.make_tensor_value_info("e_out", TP.FLOAT, None)],
    )
    graph = h.make_graph(
        [h.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "g",
        [h.make_tensor_value_info("cond", TP.BOOL, []), h.make_tensor_value_info("x", TP.FLOAT, ["N", 3])],
        [h.make_tensor_value_info("y", TP.FLOAT, None)],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


# --------------------------------------------------------------------------- remove-unused


@pytest.mark.parametrize("dynamo,opset", [(True, 18), (False, 13)])
def test_remove_unused_dead_branch(dynamo, opset):
    original = export("dead_branch", dynamo, opset)
    original.graph.outputs.pop()  # the user does not want the last output (aux): its branch is dead
    nodes, inits = node_count(original), len(original.graph.initializers)
    model = copy(original)
    result = apply("remove-unused", model)
    assert result.modified
    assert result.stats.counts["nodes_removed"] >= 3  # Gemm/MatMul, Tanh, Gemm/MatMul of aux
    assert node_count(model) == nodes - result.stats.counts["nodes_removed"]
    assert result.stats.counts["initializers_removed"] == 4  # aux.0.{weight,bias}, aux.2.{weight,bias}
    assert len(model.graph.initializers) == inits - 4
    assert not any("aux" in n for n in model.graph.initializers)
    check_same(original, model)
    assert not apply("remove-unused", model).modified


def test_remove_unused_in_subgraph():
    model = _if_model()
    then_graph = next(n for n in model.graph).attributes["then_branch"].as_graph()
    dead = ir.node("Neg", [then_graph.inputs[0] if then_graph.inputs else next(iter(then_graph)).outputs[0]])
    then_graph.append(dead)
    then_graph.register_initializer(ir.Value(name="unused_w", const_value=ir.tensor(np.ones(4, np.float32))))
    original = copy(model)
    result = apply("remove-unused", model)
    assert result.stats.counts["nodes_removed"] == 1
    assert result.stats.counts["initializers_removed"] == 1
    feeds = {"x": np.ones((2, 3), np.float32), "cond": np.array(True)}
    assert_outputs_close(original, model, feeds)


# --------------------------------------------------------------------------- eliminate-identity


def _insert_dropout(model: ir.Model, training_mode: bool | None, ratio: float = 0.5) -> ir.Node:
    """Put a Dropout after the first Relu (torch's exporters drop Dropout in eval mode)."""
    graph = model.graph
    relu = next(n for n in graph if n.op_type == "Relu")
    readers = list(relu.outputs[0].uses())
    inputs = [relu.outputs[0]]
    if training_mode is not None or ratio != 0.5:
        r = ir.Value(name="drop_ratio", const_value=ir.tensor(np.array(ratio, np.float32)))
        graph.register_initializer(r)
        inputs.append(r)
    if training_mode is not None:
        t = ir.Value(name="drop_training", const_value=ir.tensor(np.array(training_mode)))
        graph.register_initializer(t)
        inputs.append(t)
    drop = ir.node("Dropout", inputs, num_outputs=2)
    graph.insert_after(relu, drop)
    for user, idx in readers:
        user.replace_input_with(idx, drop.outputs[0])
    return drop


def test_eliminate_identity_and_dropout_dynamo():
    original = export("dropout", dynamo=True)
    _insert_dropout(original, training_mode=False)
    identities = node_count(original, "Identity")
    assert identities >= 1  # dynamo writes eval-mode dropout / clone as Identity
    model = copy(original)
    result = apply("eliminate-identity", model)
    assert result.modified
    assert node_count(model, "Identity") == 0
    assert node_count(model, "Dropout") == 0
    assert result.stats.counts["dropout_removed"] == 1
    assert result.stats.counts["identity_removed"] == identities + 1
    check_same(original, model)
    assert not apply("eliminate-identity", model).modified


def test_dropout_opset11_is_removed_and_training_dropout_kept():
    original = export("dropout", dynamo=False, opset=11)
    drop = _insert_dropout(original, training_mode=None)
    drop.resize_inputs(1)
    model = copy(original)
    result = apply("eliminate-identity", model)
    assert node_count(model, "Dropout") == 0
    check_same(original, model)

    training = export("dropout", dynamo=True)
    _insert_dropout(training, training_mode=True)
    result = apply("eliminate-identity", training)
    assert node_count(training, "Dropout") == 1
    assert any(s.op_type == "Dropout" and "training_mode" in s.reason for s in result.stats.skipped)


def test_identity_between_two_graph_outputs_keeps_both_names():
    # y = Identity(x) where x is itself a graph output: onnx_ir would rename x to y.
    original = export("small_cnn", dynamo=True)
    graph = original.graph
    out = graph.outputs[0]
    ident = ir.node("Identity", [out])
    ident.outputs[0].name = "copy_of_output"
    graph.append(ident)
    graph.outputs.append(ident.outputs[0])
    model = copy(original)
    result = apply("eliminate-identity", model)
    assert [o.name for o in model.graph.outputs] == [o.name for o in original.graph.outputs]
    assert any("graph outputs" in s.reason for s in result.stats.skipped)
    check_same(original, model)


def test_identity_in_if_subgraph():
    model = _if_model()
    original = copy(model)
    apply("eliminate-identity", model)
    assert node_count(model, "Identity") == 0
    feeds = {"x": np.ones((2, 3), np.float32), "cond": np.array(False)}
    assert_outputs_close(original, model, feeds)


# --------------------------------------------------------------------------- cse, dedup, topo-sort


def test_cse_merges_repeated_subexpression():
    original = export("repeated", dynamo=True)
    assert node_count(original, "Sigmoid") == 2
    model = copy(original)
    result = apply("cse", model)
    assert result.modified
    assert node_count(model, "Sigmoid") == 1
    assert result.stats.counts["nodes_merged"] >= 1
    check_same(original, model)
    assert not apply("cse", model).modified


@pytest.mark.parametrize("hashed", [True, False])
def test_dedup_initializers(hashed):
    original = export("repeated", dynamo=True)  # (TorchScript dedups equal weights itself)
    n = len(original.graph.initializers)
    model = copy(original)
    result = apply("dedup-initializers", model, hashed=hashed)
    assert result.modified
    assert result.stats.counts["initializers_merged"] == 2  # b.weight == a.weight, b.bias == a.bias
    assert len(model.graph.initializers) == n - 2
    check_same(original, model)
    assert not apply("dedup-initializers", model).modified


def test_dedup_initializers_non_contiguous_tensor():
    # Folding a Transpose yields a transposed (non C-contiguous) array; hashing it must not crash.
    original = export("repeated", dynamo=True)
    model = copy(original)
    for init in model.graph.initializers.values():
        array = init.const_value.numpy()
        if array.ndim == 2:
            init.const_value = ir.tensor(np.asfortranarray(array), name=init.name)
    assert any(not i.const_value.numpy().flags.c_contiguous for i in model.graph.initializers.values())
    result = apply("dedup-initializers", model)
    assert result.stats.counts["initializers_merged"] == 2
    check_same(original, model)


def test_dedup_initializers_string_and_bfloat16():
    # ONNX's node tests, frozen (issue 13): string tensors have no ``tobytes`` and the buffer protocol
    # knows no bfloat16, so hashing them crashed the pass. Equal ones merge; ["ab","c"] != ["a","bc"].
    from onnx import TensorProto, helper, numpy_helper

    from onnxforge.testing import fuzz

    s = lambda *v: np.asarray(v, dtype=object)  # noqa: E731
    bf16 = helper.make_tensor("h1", TensorProto.BFLOAT16, [2], [1.5, -2.0])
    inits = [numpy_helper.from_array(s("ab", "c"), "s1"), numpy_helper.from_array(s("ab", "c"), "s2"),
             numpy_helper.from_array(s("a", "bc"), "s3"), bf16, helper.make_tensor("h2", TensorProto.BFLOAT16, [2], [1.5, -2.0])]
    nodes = [helper.make_node("Identity", [n], [f"o_{n}"]) for n in ("s1", "s2", "s3")]
    nodes += [helper.make_node("Cast", [n], [f"o_{n}"], to=TensorProto.FLOAT) for n in ("h1", "h2")]
    outputs = [helper.make_tensor_value_info(f"o_s{i}", TensorProto.STRING, [2]) for i in (1, 2, 3)]
    outputs += [helper.make_tensor_value_info(f"o_h{i}", TensorProto.FLOAT, [2]) for i in (1, 2)]
    proto = helper.make_model(helper.make_graph(nodes, "g", [], outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    result = apply("dedup-initializers", model)
    assert result.stats.counts["initializers_merged"] == 2  # s2 -> s1, h2 -> h1; s3 stays
    assert sorted(model.graph.initializers) == ["h1", "s1", "s3"]
    outcome = fuzz.check_model(proto, "dedup-initializers", [{}])
    assert outcome.cause == "ok", outcome


def _single_node_model(node, inputs, out_type, opset=18):
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in inputs.items()]
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info(node.output[0], out_type, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_fold_constants_keeps_random_ops():
    # ONNX's node tests, frozen (issue 13): onnxscript's folder does not list Bernoulli as random, and
    # evaluates a training-mode Dropout: one draw (one mask) was baked into the model.
    from onnx import TensorProto, helper

    p = np.full((4, 5), 0.5, np.float32)
    cases = [
        (helper.make_node("Bernoulli", ["p"], ["y"]), {"p": p}),
        (helper.make_node("Dropout", ["x", "r", "t"], ["y"], seed=0),
         {"x": p, "r": np.asarray(0.5, np.float32), "t": np.asarray(True)}),
    ]
    for node, inputs in cases:
        model = ir.serde.deserialize_model(_single_node_model(node, inputs, TensorProto.FLOAT))
        result = apply("fold-constants", model)
        assert [n.op_type for n in model.graph] == [node.op_type]
        assert any("random" in s.reason for s in result.stats.skipped)  # reported, not silent
    # an inference-mode Dropout (training_mode a constant false) still folds
    node = helper.make_node("Dropout", ["x", "r", "t"], ["y"])
    model = ir.serde.deserialize_model(_single_node_model(
        node, {"x": p, "r": np.asarray(0.5, np.float32), "t": np.asarray(False)}, TensorProto.FLOAT))
    apply("fold-constants", model)
    assert [n.op_type for n in model.graph] == []


def test_fold_constants_castlike_no_saturate():
    # onnxscript's folder rewrote CastLike(saturate=0) into a Cast without saturate: float8 overflow
    # then saturated to 57344 instead of giving inf (ONNX's node test castlike_no_saturate_*).
    from onnx import TensorProto, helper

    from onnxforge.testing import fuzz

    node = helper.make_node("CastLike", ["x", "like"], ["y"], saturate=0)
    like = helper.make_tensor("like", TensorProto.FLOAT8E5M2, [0], [])
    proto = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT8E5M2, [3])], initializer=[like]),
        opset_imports=[helper.make_opsetid("", 19)])
    model = ir.serde.deserialize_model(proto)
    apply("fold-constants", model)
    assert [n.op_type for n in model.graph] == ["CastLike"]
    from onnx.reference import ReferenceEvaluator

    x = np.asarray([0.5, 1e6, -np.inf], np.float32)
    expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    actual = ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, {"x": x})[0]
    assert fuzz.compare_values(expected, actual)[0] == "ok"  # inf stays inf


def test_topo_sort_repairs_order():
    original = export("small_cnn", dynamo=True)
    model = copy(original)
    graph = model.graph
    first = next(iter(graph))
    graph.remove(first)
    graph.append(first)  # producer after its readers: invalid until sorted
    result = apply("topo-sort", model)
    assert result.modified and result.stats.counts["nodes_moved"] > 0
    assert list(model.graph)[0].op_type == first.op_type
    check_same(original, model)
    assert not apply("topo-sort", model).modified


# --------------------------------------------------------------------------- shape-inference


def test_shape_inference_annotates_values():
    model = export("small_cnn", dynamo=False, opset=13)
    for node in model.graph:
        for v in node.outputs:
            if not v.is_graph_output():
                v.shape = None
    result = apply("shape-inference", model)
    assert result.modified
    assert result.stats.counts["values_shaped"] > 0
    assert "failed" not in result.stats.counts


def test_shape_inference_failure_is_reported():
    model = export("small_cnn", dynamo=True)
    graph = model.graph
    bad = ir.Value(name="bad_int", const_value=ir.tensor(np.array([1], np.int64)))
    graph.register_initializer(bad)
    add = ir.node("Add", [graph.outputs[0], bad])  # float + int64: a type error
    graph.append(add)
    graph.outputs.append(add.outputs[0])
    result = apply("shape-inference", model)
    assert not result.modified
    assert result.stats.counts["failed"] == 1
    assert "shape_inference_error" in result.stats.details
    assert any("failed" in note for note in result.stats.notes)

    from onnxforge.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="shape-inference"):
        apply("shape-inference", model, raise_on_failure=True)


# --------------------------------------------------------------------------- fold-constants


@pytest.mark.parametrize("dynamo,opset", [(True, 18), (False, 11)])
def test_fold_constants(dynamo, opset):
    original = export("const_math", dynamo, opset)
    before = node_count(original)
    model = copy(original)
    result = apply("fold-constants", model)
    assert result.modified
    # Only x * c + d remains of ConstMath: everything computed from buffers is folded.
    assert node_count(model, "Exp") == node_count(model, "Sqrt") == 0
    assert node_count(model, "Constant") == 0
    assert result.stats.counts["nodes_folded"] == before - node_count(model) > 0
    check_same(original, model)
    assert not apply("fold-constants", model).modified


def test_fold_constants_keeps_dequantize_and_respects_size_limit():
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.arange(-6, 6, dtype=np.int8).reshape(3, 4), "w_q")
    s = onnx.numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")
    big = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "big")
    graph = h.make_graph(
        [
            h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
            h.make_node("MatMul", ["x", "w"], ["y0"]),
            h.make_node("Neg", ["big"], ["nbig"]),
            h.make_node("ReduceSum", ["nbig"], ["total"], keepdims=0),
            h.make_node("Add", ["y0", "total"], ["y"]),
        ],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=[w, s, big],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    proto.ir_version = 8
    original = ir.serde.deserialize_model(proto)

    model = copy(original)
    result = apply("fold-constants", model, input_size_limit=1000)
    assert node_count(model, "DequantizeLinear") == 1  # quantization is never folded
    assert node_count(model, "Neg") == 1  # 4096 elements > input_size_limit
    assert result.stats.counts["quantization_nodes_kept"] == 1

    model = copy(original)
    apply("fold-constants", model, input_size_limit=10000)
    assert node_count(model, "DequantizeLinear") == 1
    assert node_count(model, "Neg") == 0 and node_count(model, "ReduceSum") == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    assert_outputs_close(original, model, feeds)


def test_fold_constants_rejects_negative_limit():
    from onnxforge.errors import PassOptionError

    with pytest.raises(PassOptionError):
        create_pass("fold-constants", {"input_size_limit": -1})


def test_passes_are_registered_with_docstrings():
    from onnxforge.passes import available_passes

    passes = available_passes()
    for name in [
        "lift-constants",
        "remove-unused",
        "eliminate-identity",
        "cse",
        "dedup-initializers",
        "topo-sort",
        "shape-inference",
        "fold-constants",
    ]:
        assert name in passes
        doc = passes[name].__doc__ or ""
        assert "Lossless" in doc, name
        assert passes[name].lossless


def test_full_cleanup_chain_on_torchscript_export():
    original = zoo.constants_as_nodes(export("repeated", dynamo=False, opset=11))
    model = copy(original)
    for name in ["lift-constants", "fold-constants", "cse", "dedup-initializers", "eliminate-identity",
                 "remove-unused", "topo-sort"]:
        apply(name, model)
    assert node_count(model) < node_count(original)
    check_same(original, model)
    # run() is deterministic and outputs are finite
    out = run(model, random_inputs(model, default_dim=2))
    assert all(np.isfinite(o).all() for o in out)
