"""onnxforge.torch_export.export: both torch exporters, dynamic axes, BN kept, atomic write, error paths."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import torch

from onnxforge.errors import MissingDependencyError, UnsupportedModelError  # noqa: E402
from onnxforge.torch_export import export  # noqa: E402
from onnxforge.testing.numerics import op_count, run  # noqa: E402


class Small(torch.nn.Module):
    """Conv+BN+ReLU -> mean -> Linear, with a chunk/cat and a buffer constant."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 6)
        self.register_buffer("scale", torch.rand(6) + 0.5)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(8))
            self.bn.running_var.copy_(torch.rand(8) + 0.5)
            self.bn.weight.copy_(torch.rand(8) + 0.5)
            self.bn.bias.copy_(torch.randn(8))

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        a, b = self.fc(y).chunk(2, dim=1)
        return torch.cat([b, a], 1) * self.scale


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, left, right):
        return self.fc(left) + right, left - right


def _torch_out(module, *xs):
    with torch.no_grad():
        out = module(*xs)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _assert_close(actual, expected, rtol=1e-4, atol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        scale = float(np.abs(e).max())
        assert float(np.abs(a - e).max()) <= atol + rtol * scale


@pytest.fixture(scope="module", params=[True, False], ids=["dynamo", "torchscript"])
def exported_small(request):
    module = Small().eval()
    return request.param, module, export(module, torch.randn(1, 3, 8, 8), dynamo=request.param)


def test_dynamic_batch_matches_torch(exported_small):
    _, module, model = exported_small
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "3", "8", "8"]
    assert str(model.graph.outputs[0].shape[0]) == "batch"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
        _assert_close(run(model, {"input": x.numpy()}), _torch_out(module, x))


def test_weights_are_initializers_and_bn_is_kept(exported_small):
    dynamo, _, model = exported_small
    assert [v.name for v in model.graph.inputs] == ["input"]
    assert [v.name for v in model.graph.outputs] == ["output"]
    # conv w/b, bn x4, fc w/b, scale
    assert len([v for v in model.graph.initializers.values() if v.const_value.size > 1]) >= 9
    assert op_count(model, "BatchNormalization") == 1  # not fused into the Conv by the exporter
    assert op_count(model, "Conv") == 1
    assert model.opset_imports[""] == (18 if dynamo else 18)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_optimize_true_runs_torch_fusions():
    module = Small().eval()
    model = export(module, torch.randn(1, 3, 8, 8), optimize=True)
    assert op_count(model, "BatchNormalization") == 0
    x = torch.randn(2, 3, 8, 8)
    _assert_close(run(model, {"input": x.numpy()}), _torch_out(module, x))


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
def test_old_opsets_use_torchscript(opset):
    module = Small().eval()
    model = export(module, torch.randn(1, 3, 8, 8), opset=opset)  # dynamo=True falls back
    assert model.opset_imports[""] == opset
    x = torch.randn(3, 3, 8, 8)
    _assert_close(run(model, {"input": x.numpy()}), _torch_out(module, x))


def test_static_batch():
    model = export(Small().eval(), torch.randn(2, 3, 8, 8), dynamic_batch=False)
    assert [int(d) for d in model.graph.inputs[0].shape] == [2, 3, 8, 8]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_multiple_inputs_and_outputs(dynamo):
    module = TwoInputs().eval()
    left, right = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    model = export(module, (left, right), dynamo=dynamo, dynamic_axes={"left": {1: "seq"}, "right": {1: "seq"}})
    assert [v.name for v in model.graph.inputs] == ["left", "right"]
    assert [v.name for v in model.graph.outputs] == ["output_0", "output_1"]
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "seq", "4"]
    left, right = torch.randn(3, 7, 4), torch.randn(3, 7, 4)
    _assert_close(run(model, {"left": left.numpy(), "right": right.numpy()}), _torch_out(module, left, right))


def test_custom_names():
    model = export(Small().eval(), torch.randn(1, 3, 8, 8), input_names=["image"], output_names=["logits"])
    assert model.graph.inputs[0].name == "image"
    assert model.graph.outputs[0].name == "logits"


def test_writes_file_atomically(tmp_path):
    module = Small().eval()
    path = tmp_path / "small.onnx"
    model = export(module, torch.randn(1, 3, 8, 8), path, dynamo=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]  # no temporary left over
    loaded = onnx.load(path)
    onnx.checker.check_model(loaded)
    x = torch.randn(2, 3, 8, 8)
    np.testing.assert_array_equal(run(loaded, {"input": x.numpy()})[0], run(model, {"input": x.numpy()})[0])


def test_training_mode_is_restored():
    module = Small().train()
    export(module, torch.randn(2, 3, 8, 8), dynamo=False)
    assert module.training
    assert module.bn.training


def test_missing_torch_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'onnxforge\[torch\]'.*torch==2.13.0"):
        export(object(), ())


def test_not_a_module():
    with pytest.raises(UnsupportedModelError, match="torch.nn.Module"):
        export(lambda x: x, torch.randn(1))


def test_unknown_dynamic_axis_name():
    with pytest.raises(UnsupportedModelError, match="nosuch"):
        export(Small().eval(), torch.randn(1, 3, 8, 8), dynamic_axes={"nosuch": {1: "h"}})


def test_exporter_failure_is_wrapped():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]  # no ONNX translation

    with pytest.raises(UnsupportedModelError, match=r"dynamo exporter, opset 18\) failed for Bad") as info:
        export(Bad(), torch.randn(2, 3, 3), dynamo=True)
    assert "\x1b[" not in str(info.value)  # torch's terminal colours are stripped


def test_package_attribute_stays_callable():
    """``onnxforge.export`` is the public function even after the exporter module is imported."""
    import onnxforge
    import onnxforge.torch_export  # noqa: F401

    model = onnxforge.export(torch.nn.Linear(3, 2), torch.randn(1, 3), dynamo=False)
    assert [n.op_type for n in model.graph] == ["Gemm"]
