"""prune-channels: dependency groups, shrinking, criteria and amounts on real torch exports."""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.prune import shrink
from onnxforge.passes.prune.dependency import analyze
from onnxforge.passes.prune.shrink import param_count
from onnxforge.testing import numerics

import torch
nn = torch.nn
from onnxforge.testing import zoo


_copy = numerics.copy_model


@pytest.fixture(scope="session")
def exported(zoo_model):
    """Zoo exports, TorchScript exporter at opset 17 by default (fast); disk-cached by ``zoo_model``."""

    def get(name: str, dynamo: bool = False, opset: int = 17) -> ir.Model:
        return zoo_model(name, opset=opset, dynamo=dynamo)

    return get


assert_valid = numerics.assert_valid_model


def prune(model: ir.Model, context: PassContext | None = None, **options):
    p = create_pass("prune-channels", options, context)
    return p(model).stats


# Parameter fraction kept after ratio=0.3: about 0.7^2 for conv->conv weights, more where groups
# are blocked (output layers, residual streams into LayerNorm).
EXPECTED_KEEP = {
    "digits_cnn": (0.45, 0.60),
    "resnet_style": (0.42, 0.58),
    "mobilenetv2_style": (0.45, 0.60),
    "densenet_style": (0.47, 0.63),
    "mobilenetv3_style": (0.45, 0.60),
    "yolo_style": (0.45, 0.60),  # C2f chunks (run-time Slice bounds) prune too: about 0.50
    "mlp": (0.50, 0.65),
    "bert_encoder": (0.80, 0.92),
}


@pytest.mark.parametrize("name", list(EXPECTED_KEEP))
def test_zoo_prune_ratio_03(exported, name):
    model = exported(name)
    reference = _copy(model)
    before = param_count(model)
    stats = prune(model, ratio=0.3)
    assert stats.counts["channels_removed"] > 0
    assert_valid(model)
    feeds = zoo.feeds(name, batch=2)
    expected, actual = numerics.run(reference, feeds), numerics.run(model, feeds)
    assert [e.shape for e in expected] == [a.shape for a in actual]
    assert all(np.isfinite(a).all() for a in actual)
    keep = param_count(model) / before
    lo, hi = EXPECTED_KEEP[name]
    assert lo <= keep <= hi, f"{name}: kept {keep:.3f} of the parameters"
    assert stats.details["params_after"] == param_count(model)
    # The output layer is never pruned, and says so (bert: its output is the LayerNorm'd stream).
    reasons = " ".join(s.reason for s in stats.skipped)
    assert "graph output" in reasons or "LayerNorm" in reasons


def test_opset11_constant_node_weights(exported):
    model = zoo.constants_as_nodes(exported("resnet_style", opset=11))
    assert not model.graph.initializers
    reference = _copy(model)
    before = param_count(model)
    prune(model, ratio=0.3)
    assert_valid(model)
    keep = param_count(model) / before
    assert 0.42 <= keep <= 0.58, keep
    feeds = zoo.feeds("resnet_style", batch=2)
    assert numerics.run(model, feeds)[0].shape == numerics.run(reference, feeds)[0].shape


# --- dependency correctness: removing a channel == zeroing every contribution of it -------------


class Coupled(nn.Module):
    """A residual pair through a depthwise conv, then a Concat whose second half is a new group."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 6, 3, padding=1)
        self.e = nn.Conv2d(14, 4, 1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        s = torch.relu(self.dw(a)) + self.c(a)
        cat = torch.cat([s, torch.relu(self.d(s))], dim=1)
        return self.e(cat).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def coupled():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zoo.export_model(Coupled().eval(), (torch.randn(1, 3, 8, 8),), opset=17, dynamo=False)


def _init(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


def _space_of(dep, weight_name: str):
    return next(s for s in dep.spaces if s.node is not None and s.node.inputs[1].name == weight_name)


def _zeroed(model: ir.Model, rows: dict[str, int]) -> ir.Model:
    out = _copy(model)
    for name, row in rows.items():
        arr = _init(out, name).copy()
        arr[row] = 0
        shrink.set_constant(out.graph.initializers[name], arr)
    return out


def test_residual_and_depthwise_channels_shrink_together(coupled):
    model = _copy(coupled)
    dep = analyze(model)
    space_a = _space_of(dep, "a.weight")
    group = next(g for g in dep.groups() if space_a in g.spaces)
    names = {s.node.inputs[1].name for s in group.spaces if s.node is not None}
    assert names == {"a.weight", "c.weight"}  # the residual ties a (through dw) and c
    c = 5
    root = int(dep.roots()[space_a.start + c])
    shrink.apply(dep, {root})
    assert_valid(model)
    assert _init(model, "a.weight").shape == (7, 3, 3, 3)
    assert _init(model, "c.weight").shape == (7, 7, 1, 1)
    assert _init(model, "dw.weight").shape == (7, 1, 3, 3)
    assert _init(model, "d.weight").shape == (6, 7, 3, 3)
    assert _init(model, "e.weight").shape == (4, 13, 1, 1)
    dw = next(n for n in model.graph if n.op_type == "Conv" and n.inputs[1].name == "dw.weight")
    assert dw.attributes["group"].value == 7
    np.testing.assert_array_equal(_init(model, "e.weight"), np.delete(_init(coupled, "e.weight"), c, axis=1))
    # Removing channel c equals zeroing it where it is produced (a, dw bias, c).
    zeroed = _zeroed(coupled, {"a.weight": c, "a.bias": c, "dw.bias": c, "c.weight": c, "c.bias": c})
    feeds = numerics.random_inputs(coupled)
    numerics.assert_outputs_close(zeroed, model, feeds, rtol=1e-5)


def test_concat_offsets(coupled):
    model = _copy(coupled)
    dep = analyze(model)
    space_d = _space_of(dep, "d.weight")
    j = 2
    shrink.apply(dep, {int(dep.roots()[space_d.start + j])})
    assert_valid(model)
    assert _init(model, "d.weight").shape == (5, 8, 3, 3)
    # d's channels sit at offset 8 of the Concat: column 8 + j of e goes.
    np.testing.assert_array_equal(_init(model, "e.weight"), np.delete(_init(coupled, "e.weight"), 8 + j, axis=1))
    zeroed = _zeroed(coupled, {"d.weight": j, "d.bias": j})
    numerics.assert_outputs_close(zeroed, model, numerics.random_inputs(coupled), rtol=1e-5)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        y = nn.functional.silu(self.conv(x))
        y = y * torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        y = nn.functional.interpolate(nn.functional.hardswish(y), scale_factor=0.5, mode="nearest")
        return self.head(torch.flatten(y, 1))


def test_squeeze_excitation_and_flatten_into_gemm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = zoo.export_model(SqueezeExcite().eval(), (torch.randn(1, 3, 8, 8),), opset=17, dynamo=False)
    original = _copy(model)
    dep = analyze(model)
    space = _space_of(dep, "conv.weight")
    group = next(g for g in dep.groups() if space in g.spaces)
    # The SE gate's Mul couples conv's channels with fc2's outputs.
    assert {s.node.inputs[1].name for s in group.spaces if s.node is not None} == {"conv.weight", "fc2.weight"}
    c = 3
    shrink.apply(dep, {int(dep.roots()[space.start + c])})
    assert_valid(model)
    # Channel c -> features [16c, 16c + 16) of the Gemm after Flatten (4x4 spatial).
    w = _init(original, "head.weight")
    np.testing.assert_array_equal(_init(model, "head.weight"), np.delete(w, np.arange(16 * c, 16 * c + 16), axis=1))
    zeroed = _zeroed(original, {"conv.weight": c, "conv.bias": c})
    numerics.assert_outputs_close(zeroed, model, numerics.random_inputs(original), rtol=1e-5)


# --- options -----------------------------------------------------------------------------------


def test_round_to_and_protect(exported):
    model = exported("resnet_style")
    stem_name = "/stem/stem.0/stem.0.0/Conv"
    stats = prune(model, ratio=0.3, round_to=8, protect=["Gemm", stem_name])
    assert_valid(model)
    assert stats.counts["channels_removed"] > 0
    for node in model.graph:
        if node.op_type == "Conv":
            assert node.inputs[1].const_value.shape[0] % 8 == 0, node.name
    original = exported("resnet_style").graph.initializers
    stem = next(n for n in model.graph if n.name == stem_name)
    assert stem.inputs[1].const_value.shape == original[stem.inputs[1].name].const_value.shape
    assert any("protected" in s.reason for s in stats.skipped)
    fc = next(n for n in model.graph if n.op_type == "Gemm")
    assert fc.inputs[1].const_value.shape == original[fc.inputs[1].name].const_value.shape


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_target_flops_and_params(exported, target):
    model = exported("mobilenetv2_style")
    stats = prune(model, target_flops=target)
    assert_valid(model)
    assert stats.details["flops_after"] <= target * stats.details["flops_before"]
    assert stats.details["flops_after"] >= (target - 0.1) * stats.details["flops_before"]
    model = exported("mobilenetv2_style")
    before = param_count(model)
    prune(model, target_params=target)
    assert (target - 0.1) * before <= param_count(model) <= target * before


@pytest.mark.parametrize("criterion", ["l2", "bn-scale", "random", "activation", "entropy"])
def test_criteria_run(exported, criterion):
    from onnxforge.runtime.data import CalibrationData

    model = exported("digits_cnn")
    data = CalibrationData.from_iterable([zoo.feeds("digits_cnn", batch=4, seed=i) for i in range(4)])
    stats = prune(model, PassContext(calibration_data=data), ratio=0.3, criterion=criterion)
    assert stats.counts["channels_removed"] > 0
    assert_valid(model)


def test_criteria_choose_differently(exported):
    kept = {}
    for criterion in ("l1", "random"):
        model = exported("digits_cnn")
        prune(model, ratio=0.5, criterion=criterion)
        kept[criterion] = [tuple(n.meta.get(shrink.KEPT_META, [])) for n in model.graph if n.op_type == "Conv"]
    assert kept["l1"] != kept["random"]


def test_activation_criterion_needs_data(exported):
    from onnxforge.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="calibration data"):
        prune(exported("digits_cnn"), ratio=0.3, criterion="activation")


def test_taylor_from_torch_maps_to_initializers(exported):
    from onnxforge.passes.prune.importance import taylor_importance_from_torch

    module = zoo.build("digits_cnn")
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    importance = taylor_importance_from_torch(module, nn.functional.cross_entropy, [(x, y)])
    model = exported("digits_cnn")
    names = set(model.graph.initializers)
    matched = [k for k in importance if k in names]
    assert len(matched) >= len(importance) * 0.9, (sorted(importance), sorted(names))
    stats = prune(model, PassContext(importance=importance), ratio=0.3, criterion="taylor")
    assert stats.counts["channels_removed"] > 0
    assert not stats.notes  # every group was ranked by the given importances
    assert_valid(model)


def test_bad_options():
    from onnxforge.errors import PassOptionError

    with pytest.raises(PassOptionError):
        create_pass("prune-channels", {"ratio": 1.5})
    with pytest.raises(PassOptionError):
        create_pass("prune-channels", {"criterion": "magic"})
    with pytest.raises(PassOptionError):
        create_pass("prune-channels", {"target_flops": 0.5, "target_params": 0.5})


def test_unknown_op_blocks_with_reason():
    # A channel through an op the analysis does not know (TopK) stays, and says why.
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, 4, 4]))
    w = ir.tensor(np.random.default_rng(0).standard_normal((8, 3, 1, 1)).astype(np.float32), name="w")
    wv = ir.Value(name="w", const_value=w, shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT))
    conv = ir.node("Conv", [x, wv], name="conv")
    k = ir.Value(name="k", const_value=ir.tensor(np.array([2], np.int64), name="k"))
    topk = ir.node("TopK", [conv.outputs[0], k], num_outputs=2, name="topk")
    topk.outputs[0].name, topk.outputs[1].name = "y", "i"
    graph = ir.Graph([x], [topk.outputs[0]], nodes=[conv, topk], initializers=[wv, k], opset_imports={"": 17})
    model = ir.Model(graph, ir_version=8)
    stats = prune(model, ratio=0.5)
    assert stats.counts["channels_removed"] == 0
    assert any("TopK" in s.reason for s in stats.skipped)
