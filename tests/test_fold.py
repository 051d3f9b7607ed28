"""Specification of fold-batchnorm and fold-affine (onnxforge/passes/fold.py).

Small torch modules with non-trivial BatchNorm statistics are exported with the dynamo exporter (one
combined module, exports take seconds) and the TorchScript exporter (opset 11 and 13), then folded.
Each test checks that the folded ops are gone, that what must stay stays with a reason, and that the
outputs did not change (onnxruntime without optimizations, fp32, rtol 1e-4).
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
from onnxforge.testing.numerics import assert_outputs_close, random_inputs

import torch
nn = torch.nn


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.eps = 1e-3
    return module.eval()


# --------------------------------------------------------------------------- test modules


class ConvBn(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x))


class ConvBnReluResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn0(self.stem(x)))
        z = torch.relu(self.bn1(self.conv1(y)))
        return torch.relu(self.bn2(self.conv2(z)) + y)


class ConvTransposeBn(nn.Module):
    def __init__(self, groups=2):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.up(x))


class LinearBn1d(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(6, 5, bias=bias)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


class LinearAffine(nn.Module):
    """Linear, then per-feature ``x * scale + shift`` and ``(x - m) / s`` with constant buffers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 5))
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 5))
        self.register_buffer("m", torch.linspace(0.1, 0.3, 5))
        self.register_buffer("s", torch.linspace(1.5, 0.7, 5))

    def forward(self, x):
        return (self.fc(x) * self.scale + self.shift - self.m) / self.s


class ConvAffine(nn.Module):
    """Conv (no bias), then per-channel Mul, Add, Div and Sub, and a scalar ``1 - y``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.register_buffer("a", torch.tensor([0.5, 1.5, -2.0, 1.0]).reshape(1, 4, 1, 1))
        self.register_buffer("b", torch.tensor([0.1, -0.2, 0.3, 0.0]).reshape(4, 1, 1))
        self.register_buffer("d", torch.tensor([2.0, 4.0, 0.5, 1.0]).reshape(1, 4, 1, 1))

    def forward(self, x):
        y = (self.conv(x) * self.a + self.b) / self.d - 0.25
        return 1.0 - y


class SharedWeights(nn.Module):
    """One conv applied twice (its weight has two readers), each followed by a BatchNorm and a Mul."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x, x2):
        a = self.bn_a(self.conv(x))
        b = self.bn_b(self.conv(x2))
        v = self.fc(a.mean((2, 3)))
        w = self.fc(b.mean((2, 3)))
        return a + b, v * 3.0, w


class NotFoldable(nn.Module):
    """A BatchNorm after a ReLU; a constant that varies over space; a Conv output read twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.register_buffer("spatial", torch.linspace(0.5, 1.5, 8 * 8).reshape(1, 1, 8, 8))

    def forward(self, x):
        y = self.bn(torch.relu(self.conv(x)))
        z = self.conv2(y)
        return self.conv3(y) * self.spatial, torch.sigmoid(z) + z * 2.0


class AffineBeforeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x * 0.5 + 0.25)


class All(nn.Module):
    """Every module side by side: one dynamo export serves all dynamo tests."""

    def __init__(self):
        super().__init__()
        self.conv_bn, self.residual = ConvBn(), ConvBnReluResidual()
        self.convt = ConvTransposeBn(groups=2)
        self.lin_bn, self.lin_affine, self.conv_affine = LinearBn1d(), LinearAffine(), ConvAffine()

    def forward(self, img, small, vec):
        return (
            self.conv_bn(img),
            self.residual(img),
            self.convt(small),
            self.lin_bn(vec),
            self.lin_affine(vec),
            self.conv_affine(img),
        )


IMG, SMALL, VEC = (2, 3, 8, 8), (2, 4, 5, 5), (2, 6)

MODELS = {
    "all": lambda: (All(), (torch.randn(*IMG), torch.randn(*SMALL), torch.randn(*VEC))),
    "conv_bn": lambda: (ConvBn(), (torch.randn(*IMG),)),
    "conv_bn_nobias": lambda: (ConvBn(bias=False), (torch.randn(*IMG),)),
    "residual": lambda: (ConvBnReluResidual(), (torch.randn(*IMG),)),
    "convt_bn_g2": lambda: (ConvTransposeBn(groups=2), (torch.randn(*SMALL),)),
    "convt_bn_g1": lambda: (ConvTransposeBn(groups=1), (torch.randn(*SMALL),)),
    "linear_bn": lambda: (LinearBn1d(), (torch.randn(*VEC),)),
    "linear_nobias_bn": lambda: (LinearBn1d(bias=False), (torch.randn(*VEC),)),
    "linear_affine": lambda: (LinearAffine(), (torch.randn(*VEC),)),
    "conv_affine": lambda: (ConvAffine(), (torch.randn(*IMG),)),
    "shared": lambda: (SharedWeights(), (torch.randn(*IMG), torch.randn(*IMG))),
    "not_foldable": lambda: (NotFoldable(), (torch.randn(*IMG),)),
    "affine_before_conv": lambda: (AffineBeforeConv(), (torch.randn(*IMG),)),
}


@functools.lru_cache(maxsize=None)
def _export_bytes(name: str, dynamo: bool, opset: int) -> bytes:
    torch.manual_seed(0)
    module, example = MODELS[name]()
    randomize_bn(module)
    with torch.no_grad():
        return zoo.export_raw_bytes(module, example, dynamo=dynamo, opset=opset)


def export(name: str, dynamo: bool = False, opset: int = 13) -> ir.Model:
    """A fresh model; with dynamo, the combined :class:`All` module (opset 18)."""
    if dynamo:
        name, opset = "all", 18
    return ir.serde.deserialize_model(onnx.load_from_string(_export_bytes(name, dynamo, opset)))


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def fold(model: ir.Model, *names: str):
    results = [create_pass(n)(model) for n in names]
    return results[-1]


def check_same(original: ir.Model, transformed: ir.Model) -> float:
    feeds = random_inputs(original, seed=1, default_dim=3)
    return assert_outputs_close(original, transformed, feeds, rtol=1e-4)


def assert_idempotent(model: ir.Model, name: str) -> None:
    again = create_pass(name)(model)
    assert not again.modified, f"{name} changed the model a second time: {dict(again.stats.counts)}"


# --------------------------------------------------------------------------- fold-batchnorm


def test_fold_batchnorm_dynamo_all_patterns():
    original = export("all", dynamo=True)
    n_bn = node_count(original, "BatchNormalization")
    assert n_bn == 6  # conv_bn, 3 in residual, convtranspose, linear
    model = copy(original)
    # dynamo writes a bias-less conv's zero bias as Expand(CastLike(0), Shape(W)): fold that first.
    # dedup then makes the bias-less convs share one zero bias: a shared *bias* must not block folding.
    fold(model, "lift-constants", "fold-constants", "dedup-initializers")
    biases = [n.inputs[2] for n in model.graph if n.op_type == "Conv" and len(n.inputs) > 2]
    assert len(biases) != len(set(biases))
    unfolded = node_count(model)
    result = fold(model, "fold-batchnorm")
    assert result.modified
    assert node_count(model, "BatchNormalization") == 0
    assert result.stats.counts["batchnorm_folded"] == n_bn
    assert node_count(model) == unfolded - n_bn
    assert not result.stats.skipped
    check_same(original, model)
    assert_idempotent(model, "fold-batchnorm")


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(
    "name,n_bn",
    [("conv_bn", 1), ("conv_bn_nobias", 1), ("residual", 3), ("convt_bn_g2", 1), ("convt_bn_g1", 1),
     ("linear_bn", 1)],
)
def test_fold_batchnorm_torchscript(name, n_bn, opset):
    original = export(name, dynamo=False, opset=opset)
    assert node_count(original, "BatchNormalization") == n_bn
    model = copy(original)
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 0
    assert node_count(model) == node_count(original) - n_bn
    assert result.stats.counts["batchnorm_folded"] == n_bn
    check_same(original, model)
    assert_idempotent(model, "fold-batchnorm")


def test_fold_batchnorm_creates_bias_for_biasless_conv():
    original = export("conv_bn_nobias", opset=13)
    conv = next(n for n in original.graph if n.op_type == "Conv")
    assert len(conv.inputs) == 2
    model = copy(original)
    fold(model, "fold-batchnorm")
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert len(conv.inputs) == 3 and conv.inputs[2].const_value is not None
    check_same(original, model)


def test_fold_batchnorm_into_matmul():
    # Linear without bias: TorchScript writes MatMul; BatchNorm after it becomes one Gemm.
    original = export("linear_nobias_bn", opset=13)
    assert node_count(original, "MatMul") == 1
    model = copy(original)
    fold(model, "fold-constants")  # MatMul(x, Transpose(W)): the Transpose of a weight folds
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 0
    assert node_count(model, "MatMul") == 0 and node_count(model, "Gemm") == 1
    assert result.stats.counts["batchnorm_folded"] == 1
    check_same(original, model)


def test_fold_batchnorm_refuses_shared_weight():
    original = export("shared", opset=13)
    assert node_count(original, "BatchNormalization") == 2
    model = copy(original)
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 2
    assert not result.modified
    reasons = [s.reason for s in result.stats.skipped if s.op_type == "BatchNormalization"]
    assert len(reasons) == 2 and all("shared" in r or "used by another node" in r for r in reasons), reasons
    check_same(original, model)


def test_fold_batchnorm_reports_what_it_leaves():
    original = export("not_foldable", opset=13)
    model = copy(original)
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 1  # follows a Relu
    (skip,) = [s for s in result.stats.skipped if s.op_type == "BatchNormalization"]
    assert skip.reason
    check_same(original, model)


def test_fold_batchnorm_refuses_training_mode_and_non_constant_stats():
    model = export("conv_bn", opset=13)
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    bn.attributes["training_mode"] = ir.AttrInt64("training_mode", 1)
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 1
    assert any("training" in s.reason for s in result.stats.skipped)

    model = export("conv_bn", opset=13)
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    mean = bn.inputs[3]
    new_input = ir.Value(name="live_mean", type=mean.type, shape=mean.shape)
    model.graph.inputs.append(new_input)
    bn.replace_input_with(3, new_input)
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 1
    assert any("live_mean" in s.reason for s in result.stats.skipped)


def test_fold_batchnorm_refuses_when_conv_output_is_read_elsewhere():
    original = export("conv_bn", opset=13)
    conv = next(n for n in original.graph if n.op_type == "Conv")
    original.graph.outputs.append(conv.outputs[0])  # the pre-BN activations are also wanted
    model = copy(original)
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 1
    assert result.stats.skipped
    check_same(original, model)


def test_fold_batchnorm_in_if_subgraph():
    original = _if_conv_bn_model()
    model = copy(original)
    result = fold(model, "fold-batchnorm")
    assert node_count(model, "BatchNormalization") == 0
    assert result.stats.counts["batchnorm_folded"] == 1
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)}
    for flag in (True, False):
        feeds["cond"] = np.array(flag)
        assert_outputs_close(original, model, feeds)


def _if_conv_bn_model() -> ir.Model:
    """If(cond, then: BN(Conv(x, W)) with weights inside the branch, else: Relu(x))."""
    h, TP = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)

    def init(name, arr):
        return onnx.numpy_helper.from_array(arr.astype(np.float32), name)

    then_graph = h.make_graph(
        [
            h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["t_out"], epsilon=1e-3),
        ],
        "then",
        [],
        [h.make_tensor_value_info("t_out", TP.FLOAT, None)],
        initializer=[
            init("w", rng.standard_normal((3, 3, 3, 3))),
            init("g", rng.random(3) + 0.5),
            init("b", rng.standard_normal(3)),
            init("m", rng.standard_normal(3)),
            init("v", rng.random(3) + 0.5),
        ],
    )
    else_graph = h.make_graph(
        [h.make_node("Relu", ["x"], ["e_out"])],
        "else",
        [],
        [h.make_tensor_value_info("e_out", TP.FLOAT, None)],
    )
    graph = h.make_graph(
        [h.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "g",
        [
            h.make_tensor_value_info("cond", TP.BOOL, []),
            h.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 5, 5]),
        ],
        [h.make_tensor_value_info("y", TP.FLOAT, None)],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


# --------------------------------------------------------------------------- fold-affine


def test_fold_affine_dynamo():
    original = export("all", dynamo=True)
    model = copy(original)
    fold(model, "lift-constants", "fold-constants")  # scalars as Constant nodes, computed zero biases
    lifted = copy(model)
    result = fold(model, "fold-affine")
    assert result.modified
    # LinearAffine: Mul, Add, Sub, Div after the Gemm; ConvAffine: Mul, Add, Div, Sub, Sub(1 - y).
    assert result.stats.counts["nodes_removed"] == 9, dict(result.stats.counts)
    for op in ("Mul", "Div", "Sub"):
        assert node_count(model, op) == 0, op
    assert node_count(model, "Add") == node_count(lifted, "Add") - 2  # the residual Add stays
    check_same(original, model)
    assert_idempotent(model, "fold-affine")


@pytest.mark.parametrize("opset", [11, 13])
def test_fold_affine_linear_scale_shift(opset):
    original = export("linear_affine", opset=opset)
    model = copy(original)
    result = fold(model, "lift-constants", "fold-affine")
    assert [n.op_type for n in model.graph] == ["Gemm"]
    assert result.stats.counts["nodes_removed"] == 4
    check_same(original, model)
    assert_idempotent(model, "fold-affine")


@pytest.mark.parametrize("opset", [11, 13])
def test_fold_affine_conv_per_channel(opset):
    original = export("conv_affine", opset=opset)
    conv = next(n for n in original.graph if n.op_type == "Conv")
    assert len(conv.inputs) == 2  # no bias: the pass creates one
    model = copy(original)
    fold(model, "lift-constants", "fold-affine")
    assert [n.op_type for n in model.graph] == ["Conv"]
    check_same(original, model)


def test_fold_affine_refuses_shared_weight():
    original = export("shared", opset=13)
    model = copy(original)
    result = fold(model, "lift-constants", "fold-affine")
    # v * 3.0 follows fc, whose weight is also read by the second fc call.
    assert node_count(model, "Mul") == node_count(original, "Mul")
    assert any("shared" in s.reason for s in result.stats.skipped), result.stats.skipped
    check_same(original, model)


def test_fold_affine_refuses_spatial_constant_and_multi_reader():
    original = export("not_foldable", opset=13)
    model = copy(original)
    result = fold(model, "lift-constants", "fold-affine")
    assert node_count(model, "Mul") == node_count(original, "Mul")
    reasons = " | ".join(s.reason for s in result.stats.skipped)
    assert "axis 2 (spatial)" in reasons, reasons  # conv3(y) * spatial varies along H and W
    assert "also read by another node" in reasons, reasons  # z * 2.0: z is also read by Sigmoid
    check_same(original, model)


def test_fold_affine_before_conv():
    original = export("affine_before_conv", opset=13)
    model = copy(original)
    result = fold(model, "lift-constants", "fold-affine")
    assert [n.op_type for n in model.graph] == ["Conv"], [n.op_type for n in model.graph]
    assert result.stats.counts["nodes_removed"] == 2
    check_same(original, model)


def test_fold_affine_before_conv_with_the_constant_first():
    """``Conv(Add(c2, Mul(c1, x)))``, operands as paddle2onnx writes them (PP-OCR's learnable affine
    blocks before each 1x1 conv): folded like ``x * c1 + c2``."""
    original = export("affine_before_conv", opset=13)
    for node in original.graph:
        if node.op_type in ("Mul", "Add"):
            a, b = node.inputs
            node.replace_input_with(0, b)
            node.replace_input_with(1, a)
    mul, add = (next(n for n in original.graph if n.op_type == t) for t in ("Mul", "Add"))
    assert mul.inputs[1] is original.graph.inputs[0] and add.inputs[1] is mul.outputs[0]  # constants first
    model = copy(original)
    fold(model, "lift-constants", "fold-affine")
    assert [n.op_type for n in model.graph] == ["Conv"], [n.op_type for n in model.graph]
    check_same(original, model)


def test_fold_batchnorm_then_affine_chain_torchscript_opset11():
    # The whole chain as the O1 preset would run it, on an old-opset export with Constant nodes.
    for name in ["residual", "linear_affine", "convt_bn_g2"]:
        original = export(name, opset=11)
        model = copy(original)
        fold(model, "lift-constants", "fold-batchnorm", "fold-affine", "remove-unused")
        assert node_count(model, "BatchNormalization") == 0
        check_same(original, model)


def test_registered_and_documented():
    from onnxforge.passes import available_passes

    passes = available_passes()
    for name in ("fold-batchnorm", "fold-affine"):
        assert name in passes and "Lossless" in (passes[name].__doc__ or "")
