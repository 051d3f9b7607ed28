"""The model zoo and the digits demo data: every model exports, runs in onnxruntime and matches torch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import torch

from onnxforge.testing import digits as digits_lib  # noqa: E402
from onnxforge.testing import zoo  # noqa: E402
from onnxforge.testing.numerics import op_count, run  # noqa: E402

SMALL = [n for n in zoo.MODELS if n != "resnet_style"]  # resnet_style (11M params) is tested once


def _torch_outputs(name, inputs):
    with torch.no_grad():
        out = zoo.build(name)(*inputs)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _assert_matches_torch(model, name, batch, seq=None, rtol=1e-4, atol=1e-5):
    spec = zoo.MODELS[name]
    inputs = spec.example_inputs(batch=batch, seq=seq, seed=batch)
    actual = run(model, {n: t.numpy() for n, t in zip(spec.input_names, inputs)})
    expected = _torch_outputs(name, inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert float(np.abs(a - e).max()) <= atol + rtol * float(np.abs(e).max()), name


@pytest.mark.parametrize("name", SMALL)
def test_dynamo_export_matches_torch(zoo_model, name):
    model = zoo_model(name)
    assert model.opset_imports[""] == 18
    assert all(str(v.shape[0]) == "batch" for v in [*model.graph.inputs, *model.graph.outputs])
    assert len(model.graph.initializers) > 0
    for batch in (1, 2):
        _assert_matches_torch(model, name, batch)


def test_resnet_style_once(zoo_model):
    model = zoo_model("resnet_style")
    params = sum(v.const_value.size for v in model.graph.initializers.values())
    assert 10e6 < params < 12e6
    assert op_count(model, "Conv") == 20  # 17 3x3/7x7 + 3 downsample branches
    _assert_matches_torch(model, "resnet_style", 1)


@pytest.mark.parametrize("name", [n for n in zoo.OPSET11_MODELS if n != "resnet_style"])
def test_opset11_export_matches_torch(zoo_model, name):
    model = zoo_model(name, opset=11, dynamo=False)
    assert model.opset_imports[""] == 11
    _assert_matches_torch(model, name, 2)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_bert_dynamic_batch_and_sequence(zoo_model, dynamo):
    model = zoo_model("bert_encoder", opset=18 if dynamo else 11, dynamo=dynamo)
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "seq"]
    assert model.graph.inputs[0].dtype == ir.DataType.INT64
    assert op_count(model, "Softmax") == 2 and op_count(model, "MatMul") >= 4
    for batch, seq in ((1, 16), (3, 7), (2, 33)):
        _assert_matches_torch(model, "bert_encoder", batch, seq)


@pytest.mark.parametrize("name", ["conv_bn", "digits_cnn", "yolo_style", "bert_encoder", "dead_branch"])
def test_constants_as_nodes(zoo_model, name):
    model = zoo_model(name)
    n_init = len(model.graph.initializers)
    converted = zoo.constants_as_nodes(model)
    assert len(converted.graph.initializers) == 0
    assert op_count(converted, "Constant") == n_init + op_count(model, "Constant")
    assert len(model.graph.initializers) == n_init  # the input model is left alone
    feeds = zoo.feeds(name, batch=2)
    for a, b in zip(run(model, feeds), run(converted, feeds)):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_statistics_are_not_trivial(zoo_model):
    model = zoo_model("conv_bn")
    (bn,) = [n for n in model.graph if n.op_type == "BatchNormalization"]
    scale, bias, mean, var = (v.const_value.numpy() for v in bn.inputs[1:])
    for arr, trivial in ((scale, 1.0), (bias, 0.0), (mean, 0.0), (var, 1.0)):
        assert np.abs(arr - trivial).min() > 1e-3


def test_every_cnn_with_bn_keeps_it(zoo_model):
    for name in ("conv_bn_relu_residual", "convtranspose_bn", "linear_bn1d", "mobilenetv2_style"):
        assert op_count(zoo_model(name), "BatchNormalization") > 0, name


def test_shared_weights_has_a_shared_conv_weight(zoo_model):
    model = zoo_model("shared_weights")
    uses = {
        name: sum(1 for user, _ in v.uses() if user.op_type == "Conv")
        for name, v in model.graph.initializers.items()
    }
    assert max(uses.values()) == 2
    gemm_weights = [n.inputs[1] for n in model.graph if n.op_type == "Gemm"]
    assert len(gemm_weights) == 3 and len({id(w) for w in gemm_weights}) == 2  # fc used twice


def test_dead_branch_reaches_no_output(zoo_model):
    model = zoo_model("dead_branch")
    live: set[int] = set()
    stack = [v.producer() for v in model.graph.outputs]
    while stack:
        node = stack.pop()
        if node is None or id(node) in live:
            continue
        live.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None)
    dead = [n.op_type for n in model.graph if id(n) not in live]
    assert sorted(dead) == ["Conv", "Sigmoid"]


def test_yolo_has_split_resize_concat_and_three_outputs(zoo_model):
    model = zoo_model("yolo_style")
    assert len(model.graph.outputs) == 3
    for op in ("Split", "Resize", "Concat", "Sigmoid"):
        assert op_count(model, op) > 0, op


def test_mobilenetv3_has_depthwise_hardswish_and_se(zoo_model):
    model = zoo_model("mobilenetv3_style")
    assert op_count(model, "HardSwish") > 0 and op_count(model, "HardSigmoid") > 0
    assert any(n.op_type == "Conv" and n.attributes.get_int("group", 1) > 1 for n in model.graph)


def test_builders_are_deterministic():
    a, b = zoo.build("digits_cnn").state_dict(), zoo.build("digits_cnn").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_cache_returns_fresh_models(tmp_path):
    first = zoo.export_cached("mlp", opset=13, dynamo=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mlp-opset13-torchscript-*.onnx"))) == 1
    first.graph.remove(list(first.graph)[-1], safe=False)  # modify the model
    second = zoo.export_cached("mlp", opset=13, dynamo=False, cache_dir=tmp_path)
    assert len(second.graph) == 5
    _assert_matches_torch(second, "mlp", 1)


def test_unknown_name_lists_the_zoo():
    with pytest.raises(KeyError, match="conv_bn"):
        zoo.build("nosuch")


def test_export_model_of_a_module_needs_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        zoo.export_model(zoo.build("mlp"))
    model = zoo.export_model(zoo.build("mlp"), zoo.example_inputs("mlp", batch=2), dynamo=False)
    assert model.graph.inputs[0].name == "input"


# --- digits ----------------------------------------------------------------------------------------------


def test_digits_split(digits):
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == np.float32 and y_test.dtype == np.int64
    assert x_train.min() == -1.0 and x_train.max() == 1.0
    assert set(np.unique(y_test)) == set(range(10))
    again = digits_module_split()
    np.testing.assert_array_equal(again[2], x_test)


def digits_module_split():
    return digits_lib.load_digits_split()


def test_demo_model_accuracy(demo_model_path, demo_data_path, digits):
    _, _, x_test, y_test = digits
    data = np.load(demo_data_path)
    assert sorted(data.files) == ["input", "x_test", "y_test"]
    np.testing.assert_array_equal(data["x_test"], x_test)
    assert data["input"].shape == (256, 1, 8, 8)
    assert demo_model_path.stat().st_size < 1_000_000
    model = ir.load(demo_model_path)
    assert model.graph.inputs[0].name == "input"
    assert op_count(model, "BatchNormalization") == 5
    acc = digits_lib.accuracy(demo_model_path, x_test, y_test)
    assert acc >= 0.97
    assert digits_lib.accuracy(model, x_test, y_test, batch=7) == acc


def test_training_is_deterministic_and_accurate(digits):
    _, _, x_test, y_test = digits
    a = digits_train(epochs=2)
    b = digits_train(epochs=2)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with torch.no_grad():
        acc = float((a(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    assert acc > 0.85


def digits_train(epochs):
    return digits_lib.train_digits_cnn(seed=0, epochs=epochs)


def test_accuracy_with_fixed_batch_model(digits):
    _, _, x_test, y_test = digits
    module = zoo.build("digits_cnn")
    model = zoo.export_model(module, (torch.from_numpy(x_test[:4]),), dynamo=False, dynamic_batch=False)
    assert [int(d) for d in model.graph.inputs[0].shape] == [4, 1, 8, 8]
    with torch.no_grad():
        expected = float((module(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    assert digits_lib.accuracy(model, x_test[:10], y_test[:10]) == pytest.approx(
        float((module(torch.from_numpy(x_test[:10])).argmax(1).numpy() == y_test[:10]).mean())
    )
    assert digits_lib.accuracy(model, x_test, y_test) == pytest.approx(expected)
