"""activations.collect / collect_stats on an exported torch model (checked against forward hooks),
on a hand-built model without type annotations, and on a model with an If subgraph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxforge.errors import CalibrationDataError
from onnxforge.runtime import activations
from onnxforge.runtime.activations import ChannelMeanAbs, MinMax, collect, collect_stats
from onnxforge.runtime.data import CalibrationData

import torch


@pytest.fixture(scope="module")
def residual():
    """(torch module, exported onnx_ir.Model, 3 feed dicts with batch 2)."""
    from onnxforge.testing import zoo

    module = zoo.build("conv_bn_relu_residual")
    model = zoo.export_model("conv_bn_relu_residual")
    feeds = [zoo.feeds("conv_bn_relu_residual", batch=2, seed=s) for s in range(3)]
    return module, model, feeds


def _outputs_of(model: ir.Model, op_type: str) -> list[str]:
    return [node.outputs[0].name for node in model.graph if node.op_type == op_type]


def test_collect_matches_torch_forward_hooks(residual):
    module, model, feeds = residual
    original = ir.serde.serialize_model(model).SerializeToString()
    convs, relus = _outputs_of(model, "Conv"), _outputs_of(model, "Relu")
    assert len(convs) == 3 and len(relus) == 3
    # torch side: the stem conv, the conv1 conv, the stem ReLU and the conv1 ReLU
    hooked = {"stem_conv": module.stem[0], "conv1_conv": module.conv1[0],
              "stem_relu": module.stem[2], "conv1_relu": module.conv1[2]}
    seen: dict[str, list[np.ndarray]] = {k: [] for k in hooked}
    handles = [m.register_forward_hook(lambda _m, _i, out, k=k: seen[k].append(out.detach().numpy()))
               for k, m in hooked.items()]
    with torch.no_grad():
        for f in feeds:
            module(torch.from_numpy(f["input"]))
    for h in handles:
        h.remove()

    names = [convs[0], convs[1], relus[0], relus[1]]
    acts = collect(model, feeds, names)
    assert list(acts) == names and acts.skipped == {} and acts.n_samples == 3
    for name, key in zip(names, ["stem_conv", "conv1_conv", "stem_relu", "conv1_relu"]):
        assert len(acts[name]) == 3
        for got, want in zip(acts[name], seen[key]):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # the caller's model is untouched: no extra outputs
    assert ir.serde.serialize_model(model).SerializeToString() == original
    assert [v.name for v in model.graph.outputs] == ["output"]


def test_collect_inputs_outputs_max_samples_and_reducer(residual):
    _, model, feeds = residual
    out_name = model.graph.outputs[0].name
    acts = collect(model, CalibrationData.from_iterable(feeds, model), ["input", out_name], max_samples=2)
    assert [len(v) for v in acts.values()] == [2, 2]
    np.testing.assert_array_equal(acts["input"][1], feeds[1]["input"])
    maxes = collect(model, feeds, [out_name], reducer=lambda n, a: float(np.abs(a).max()))
    assert all(isinstance(v, float) for v in maxes[out_name]) and len(maxes[out_name]) == 3


def test_collect_stats_streams_into_reducers(residual):
    _, model, feeds = residual
    relu = _outputs_of(model, "Relu")[0]
    full = collect(model, feeds, [relu])[relu]
    stats = collect_stats(model, feeds, [relu, "missing_value"], MinMax)
    assert set(stats) == {relu} and "missing_value" in stats.skipped
    assert stats[relu].count == 3
    assert stats[relu].min == pytest.approx(min(a.min() for a in full))
    assert stats[relu].max == pytest.approx(max(a.max() for a in full))
    per_channel = collect_stats(model, feeds, [relu], ChannelMeanAbs)[relu].value
    expected = np.mean(np.abs(np.concatenate(full, axis=0)), axis=(0, 2, 3))
    np.testing.assert_allclose(per_channel, expected, rtol=1e-6)


def test_collect_validates_feeds(residual):
    _, model, _ = residual
    with pytest.raises(CalibrationDataError, match="missing input"):
        collect(model, [{"image": np.zeros((1, 3, 16, 16), np.float32)}], [_outputs_of(model, "Relu")[0]])


def untyped_model() -> onnx.ModelProto:
    """x -> Mul(2) -> Add(1) -> y, no value_info for the intermediates (as older exporters write)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"]), helper.make_node("Add", ["doubled", "one"], ["y"])],
        "untyped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                     helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_collect_uses_shape_inference_for_untyped_values():
    model = ir.serde.deserialize_model(untyped_model())
    assert {n.outputs[0].name: n.outputs[0].dtype for n in model.graph}["doubled"] is None
    acts = collect(model, [{"x": np.array([1.0, -3.0], np.float32)}], ["doubled"])
    np.testing.assert_array_equal(acts["doubled"][0], [2.0, -6.0])


def if_model() -> onnx.ModelProto:
    """y = If(cond, then: x*2 (via inner value 't_inner'), else: x-1 (via 'e_inner')); 'pre' = x+0 outside."""
    then = helper.make_graph(
        [helper.make_node("Mul", ["pre", "two"], ["t_inner"]), helper.make_node("Identity", ["t_inner"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2])])
    other = helper.make_graph(
        [helper.make_node("Sub", ["pre", "one"], ["e_inner"]), helper.make_node("Identity", ["e_inner"], ["e_out"])],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zero"], ["pre"]),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)],
        "with_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                     helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                     helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_values_are_skipped_with_a_reason():
    model = ir.serde.deserialize_model(if_model())
    feeds = [{"x": np.array([1.0, 2.0], np.float32), "cond": np.array(True)}]
    acts = collect(model, feeds, ["pre", "t_inner", "e_inner", "y", "nowhere"])
    assert set(acts) == {"pre", "y"}
    np.testing.assert_array_equal(acts["y"][0], [2.0, 4.0])
    assert "subgraph of If node 'branch'" in acts.skipped["t_inner"]
    assert "subgraph of If node 'branch'" in acts.skipped["e_inner"]
    assert "no value" in acts.skipped["nowhere"]


def test_only_skipped_values_need_no_session():
    model = ir.serde.deserialize_model(if_model())
    acts = activations.collect(model, [{"x": np.zeros(2, np.float32), "cond": np.array(False)}], ["t_inner"])
    assert dict(acts) == {} and "t_inner" in acts.skipped


def test_model_with_external_data(tmp_path):
    """An onnx_ir model whose weights are still in an external file (loaded lazily)."""
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[onnx.numpy_helper.from_array(weight, "W")],
    )
    path = tmp_path / "ext.onnx"
    ir.save(ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])),
            path, external_data="ext.data", size_threshold_bytes=0)
    model = ir.load(path)
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    x = -np.ones((1, 4), np.float32)
    acts = collect(model, [{"x": x}], ["h"])
    np.testing.assert_allclose(acts["h"][0], x @ weight)
    from onnxforge.runtime.session import make_session, run

    for source in (model, str(path)):
        np.testing.assert_allclose(run(make_session(source), {"x": x})["y"], np.maximum(x @ weight, 0))
