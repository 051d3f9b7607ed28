"""The ``fuse`` pass on CNN patterns: one small torch module per rule, exported, fused, compared.

The TorchScript exporter is used where the dynamo exporter's own onnxscript optimization would
already remove the pattern (so that the test sees it); every test checks that the pattern was in the
exported graph before fusing.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.torch_export import export
from onnxforge.passes import PassContext, create_pass
from onnxforge.testing import numerics

import torch
nn = torch.nn
F = torch.nn.functional


def _fuse(model: ir.Model, target: str = "cpu", explain: bool = False, **options):
    fused = ir.from_proto(ir.to_proto(model))
    result = create_pass("fuse", options, PassContext(target=target, explain=explain))(fused)
    return fused, result.stats


def _export(module, shape, dynamo=False):
    torch.manual_seed(0)
    return export(module.eval(), (torch.randn(*shape),), dynamo=dynamo)


def _check_close(model, fused, shape, seed=0):
    feeds = {model.graph.inputs[0].name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
    numerics.assert_outputs_close(model, fused, feeds, rtol=1e-4)


class ConvAct(nn.Module):
    def __init__(self, act, bias=True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


_ACTS = {
    "Relu": nn.ReLU(),
    "LeakyRelu": nn.LeakyReLU(0.1),
    "Sigmoid": nn.Sigmoid(),
    "Tanh": nn.Tanh(),
    "Clip": nn.ReLU6(),
    "HardSigmoid": nn.Hardsigmoid(),
}


@pytest.mark.parametrize("act", list(_ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_conv_activation_to_fused_conv(act, bias):
    model = _export(ConvAct(_ACTS[act], bias), (2, 3, 8, 8))
    assert numerics.op_count(model, act) == 1
    fused, stats = _fuse(model, rules=["FusedConv"])
    nodes = [n for n in fused.graph if n.op_type == "FusedConv"]
    assert len(nodes) == 1 and nodes[0].domain == "com.microsoft"
    assert nodes[0].attributes["activation"].as_string() == act
    assert numerics.op_count(fused, act) == 0 and numerics.op_count(fused, "Conv") == 0
    assert stats.counts["FusedConv"] == 1
    _check_close(model, fused, (3, 3, 8, 8))


def test_fused_conv_cuda_only_relu_and_none_for_tensorrt_or_onnx():
    relu = _export(ConvAct(nn.ReLU()), (1, 3, 8, 8))
    sig = _export(ConvAct(nn.Sigmoid()), (1, 3, 8, 8))
    assert numerics.op_count(_fuse(relu, target="cuda", rules=["FusedConv"])[0], "FusedConv") == 1
    assert numerics.op_count(_fuse(sig, target="cuda", rules=["FusedConv"])[0], "FusedConv") == 0
    assert numerics.op_count(_fuse(relu, target="cpu")[0], "FusedConv") == 0  # opt-in only
    for target in ("tensorrt", "onnx"):
        fused, stats = _fuse(relu, target=target, rules=["FusedConv"])
        assert numerics.op_count(fused, "FusedConv") == 0
        assert any(n.startswith("FusedConv: not applied") for n in stats.notes)


def test_conv_silu_is_a_reported_near_miss():
    model = _export(ConvAct(nn.SiLU()), (1, 3, 8, 8))
    fused, stats = _fuse(model, explain=True, rules=["FusedConv"])
    assert numerics.op_count(fused, "FusedConv") == 0 and numerics.op_count(fused, "Conv") == 1
    reasons = [m["reason"] for m in stats.details["near_misses"] if m["rule"] == "FusedConv"]
    assert any("no SiLU activation" in r for r in reasons)
    _check_close(model, fused, (1, 3, 8, 8))


class ConvShared(nn.Module):
    """The Conv output feeds Relu and also an output: FusedConv must not swallow it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y), y


def test_fused_conv_refuses_shared_conv_output():
    model = _export(ConvShared(), (1, 3, 8, 8))
    fused, _ = _fuse(model, rules=["FusedConv"])
    assert numerics.op_count(fused, "FusedConv") == 0
    assert numerics.op_count(fused, "Relu") == 1


class ManualHardSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * F.relu6(y + 3.0) / 6.0


def test_hardswish_from_clip_form():
    model = _export(ManualHardSwish(), (1, 3, 6, 6))
    assert numerics.op_count(model, "Clip") == 1
    fused, stats = _fuse(model, rules=["HardSwish"])
    assert numerics.op_count(fused, "HardSwish") == 1
    assert numerics.op_count(fused, "Clip") == 0
    assert stats.counts["HardSwish"] >= 1
    _check_close(model, fused, (2, 3, 6, 6))


def test_hardswish_below_opset_14_becomes_x_times_hardsigmoid():
    """Opset 12 (paddle2onnx's PP-OCR models) has no HardSwish: x·Clip(x+3,0,6)/6 → x·HardSigmoid(x)."""
    model = _export(ManualHardSwish(), (1, 3, 6, 6))
    model.opset_imports[""] = 12  # Add, Clip (min/max inputs), Mul, Div: all opset-12 ops
    fused, stats = _fuse(model, rules=["HardSwish"])
    assert numerics.op_count(fused, "HardSwish") == 0 and numerics.op_count(fused, "HardSigmoid") == 1
    assert numerics.op_count(fused, "Clip") == 0 and numerics.op_count(fused, "Div") == 0
    (hs,) = [n for n in fused.graph if n.op_type == "HardSigmoid"]
    assert hs.attributes["alpha"].value == pytest.approx(1 / 6) and hs.attributes["beta"].value == 0.5
    assert stats.counts["HardSwish"] >= 1
    _check_close(model, fused, (2, 3, 6, 6))


class PadConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, 2, 2)))


def test_pad_into_conv():
    model = _export(PadConv(), (1, 3, 8, 8), dynamo=True)
    assert numerics.op_count(model, "Pad") == 1
    fused, stats = _fuse(model, rules=["PadConv"])
    assert numerics.op_count(fused, "Pad") == 0
    assert stats.counts["PadConv"] >= 1
    _check_close(model, fused, (2, 3, 8, 8))


class MatMulAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.matmul(x, self.w) + self.b


def test_matmul_add_to_gemm():
    model = _export(MatMulAdd(), (4, 16))
    assert numerics.op_count(model, "MatMul") == 1
    fused, stats = _fuse(model, rules=["Gemm"])
    assert numerics.op_count(fused, "Gemm") == 1 and numerics.op_count(fused, "MatMul") == 0
    assert stats.counts["Gemm"] == 1
    _check_close(model, fused, (4, 16))


class TransposeTwice(nn.Module):
    def forward(self, x):
        return torch.relu(x.permute(0, 2, 1, 3).permute(0, 1, 3, 2))


def test_transpose_chain():
    model = _export(TransposeTwice(), (2, 3, 4, 5), dynamo=True)
    assert numerics.op_count(model, "Transpose") == 2
    fused, stats = _fuse(model, rules=["TransposeChain"])
    assert numerics.op_count(fused, "Transpose") == 1
    assert stats.counts["TransposeChain"] >= 1
    _check_close(model, fused, (2, 3, 4, 5))


class ReshapeTwice(nn.Module):
    def forward(self, x):
        return torch.relu(x.reshape(2, 12, 5).reshape(6, 20))


def test_reshape_chain():
    model = _export(ReshapeTwice(), (2, 3, 4, 5))
    before = numerics.op_count(model, "Reshape")
    assert before == 2
    fused, stats = _fuse(model, rules=["ReshapeChain"])
    assert numerics.op_count(fused, "Reshape") == 1
    _check_close(model, fused, (2, 3, 4, 5))


class MinMax(nn.Module):
    def forward(self, x):
        return torch.minimum(torch.maximum(x, torch.tensor(-1.0)), torch.tensor(2.0))


def test_min_max_to_clip():
    model = _export(MinMax(), (2, 8))
    assert numerics.op_count(model, "Max") == 1 and numerics.op_count(model, "Min") == 1
    fused, stats = _fuse(model, rules=["Clip"])
    assert numerics.op_count(fused, "Clip") == 1
    assert numerics.op_count(fused, "Max") + numerics.op_count(fused, "Min") == 0
    _check_close(model, fused, (2, 8))


class ReluRelu6(nn.Module):
    def forward(self, x):
        return F.relu6(torch.relu(x))


def test_successive_relu_clip():
    model = _export(ReluRelu6(), (2, 8))
    assert numerics.op_count(model, "Relu") == 1 and numerics.op_count(model, "Clip") == 1
    fused, stats = _fuse(model, rules=["ReluClip"])
    assert numerics.op_count(fused, "Relu") + numerics.op_count(fused, "Clip") == 1
    _check_close(model, fused, (2, 8))


def test_cnn_target_onnx_has_no_contrib_ops():
    model = _export(ConvAct(nn.ReLU()), (1, 3, 8, 8), dynamo=True)
    fused, _ = _fuse(model, target="onnx", families=["cnn"])
    assert all(n.domain in ("", "ai.onnx") for n in ir.traversal.RecursiveGraphIterator(fused.graph))
    _check_close(model, fused, (2, 3, 8, 8))


# --- FusedConvAdd: Conv + residual Add (+ activation) → FusedConv with Z (CPU) ---------------------


def _z_convs(model: ir.Model) -> list[ir.Node]:
    """FusedConv nodes that use the 4th (``Z``, residual) input."""
    return [
        n for n in model.graph
        if n.op_type == "FusedConv" and n.domain == "com.microsoft" and len(n.inputs) == 4 and n.inputs[3] is not None
    ]  # fmt: skip


class ConvResidual(nn.Module):
    """``act(conv(x) + x)`` (or ``x + conv(x)``): the Add's other operand has the Conv's shape."""

    def __init__(self, act=None, bias=True, conv_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.act = act
        self.conv_first = conv_first

    def forward(self, x):
        y = self.conv(x) + x if self.conv_first else x + self.conv(x)
        return self.act(y) if self.act is not None else y


@pytest.mark.parametrize(
    "act, bias, conv_first, dynamo",
    [
        ("Relu", True, True, False),
        ("Relu", False, False, False),  # no bias: empty bias input; Add(x, conv) order
        ("Relu", True, False, True),  # dynamo export
        ("LeakyRelu", True, True, False),
        ("Clip", False, True, False),
        ("Sigmoid", True, False, False),
        (None, True, True, False),
        (None, False, False, False),
    ],
)
def test_conv_add_to_fused_conv_with_z(act, bias, conv_first, dynamo):
    model = _export(ConvResidual(_ACTS[act] if act else None, bias, conv_first), (1, 4, 8, 8), dynamo=dynamo)
    assert numerics.op_count(model, "Add") == 1
    fused, stats = _fuse(model, rules=["FusedConvAdd"])
    nodes = _z_convs(fused)
    assert len(nodes) == 1 and numerics.op_count(fused, "FusedConv") == 1
    assert nodes[0].inputs[3] is fused.graph.inputs[0]  # Z is the residual x
    assert nodes[0].inputs[3].shape == nodes[0].outputs[0].shape
    if act is None:
        assert "activation" not in nodes[0].attributes
    else:
        assert nodes[0].attributes["activation"].as_string() == act
        assert numerics.op_count(fused, act) == 0
    if act == "Clip":
        assert list(nodes[0].attributes["activation_params"].as_floats()) == [0.0, 6.0]
    if act == "LeakyRelu":
        assert nodes[0].attributes["activation_params"].as_floats()[0] == pytest.approx(0.1)
    for op in ("Conv", "Add"):
        assert numerics.op_count(fused, op) == 0
    assert stats.counts["FusedConvAdd"] == 1
    _check_close(model, fused, (3, 4, 8, 8))


class ConvAddBroadcast(nn.Module):
    """``conv(x) + x[:, :1]``: the Add broadcasts over channels, FusedConv's Z cannot."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x[:, :1])


def test_conv_add_broadcast_is_not_fused_and_is_a_near_miss():
    model = _export(ConvAddBroadcast(), (1, 4, 8, 8))
    fused, stats = _fuse(model, explain=True, rules=["FusedConvAdd"])
    assert numerics.op_count(fused, "FusedConv") == 0
    assert numerics.op_count(fused, "Conv") == 1 and numerics.op_count(fused, "Add") == 1
    assert "FusedConvAdd" not in stats.counts
    reasons = [m["reason"] for m in stats.details["near_misses"] if m["rule"] == "FusedConvAdd"]
    assert any("does not broadcast" in r for r in reasons), reasons
    _check_close(model, fused, (2, 4, 8, 8))


class ConvAddSharedSum(nn.Module):
    """The Add output feeds Relu and is an output too: the Add is fused, the Relu is kept."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x) + x
        return torch.relu(y), y


class ConvAddSharedConv(nn.Module):
    """The Conv output is an output too: nothing to fuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        c = self.conv(x)
        return torch.relu(c + x), c


def test_conv_add_respects_other_consumers():
    model = _export(ConvAddSharedSum(), (1, 4, 8, 8))
    fused, _ = _fuse(model, rules=["FusedConvAdd"])
    nodes = _z_convs(fused)
    assert len(nodes) == 1 and "activation" not in nodes[0].attributes
    assert numerics.op_count(fused, "Relu") == 1
    _check_close(model, fused, (2, 4, 8, 8))

    model = _export(ConvAddSharedConv(), (1, 4, 8, 8))
    fused, _ = _fuse(model, rules=["FusedConvAdd"])
    assert numerics.op_count(fused, "FusedConv") == 0 and numerics.op_count(fused, "Add") == 1
    _check_close(model, fused, (2, 4, 8, 8))


def test_conv_add_only_for_cpu_and_opt_in():
    model = _export(ConvResidual(nn.ReLU()), (1, 4, 8, 8))
    assert not _z_convs(_fuse(model, target="cpu")[0])  # not in the default set
    for target in ("cuda", "tensorrt", "onnx"):
        fused, stats = _fuse(model, target=target, rules=["FusedConvAdd"])
        assert numerics.op_count(fused, "FusedConv") == 0
        assert all(n.domain in ("", "ai.onnx") for n in fused.graph)
        assert any(n.startswith("FusedConvAdd: not applied") for n in stats.notes)
    fused, _ = _fuse(model, target="onnx", families=["cnn"], rules=["FusedConv", "FusedConvAdd"])
    assert all(n.domain in ("", "ai.onnx") for n in ir.traversal.RecursiveGraphIterator(fused.graph))


@pytest.fixture(scope="module")
def resnet_folded():
    from onnxforge.testing import zoo

    model = zoo.export_cached("resnet_style")
    create_pass("fold-batchnorm", {}, PassContext(target="cpu"))(model)
    return model


def test_resnet_style_residuals_become_fused_conv_with_z(resnet_folded):
    from onnxforge.testing import zoo

    model = resnet_folded
    assert numerics.op_count(model, "Add") == 8  # one residual Add per basic block
    fused, stats = _fuse(model, rules=["FusedConv", "FusedConvAdd"])
    z_nodes = _z_convs(fused)
    assert len(z_nodes) == 8 and stats.counts["FusedConvAdd"] == 8
    assert all(n.attributes["activation"].as_string() == "Relu" for n in z_nodes)
    assert numerics.op_count(fused, "Add") == 0
    assert stats.counts["FusedConv"] == 9  # stem + first conv of each block (Conv → Relu)
    numerics.assert_outputs_close(model, fused, zoo.feeds("resnet_style", batch=2), rtol=1e-4, atol=1e-4)
