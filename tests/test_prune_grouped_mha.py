"""prune-channels on grouped convolutions (ResNeXt-style) and on torch.nn.MultiheadAttention exports.

The strongest check: pruning equals zeroing. For every layer ``prune-channels`` shrank, the output
channels it dropped are zeroed (weight rows and bias) in a copy of the *unpruned* model; both models
must then give the same outputs. That holds exactly when every removed channel is removed together
with all its readers' inputs (grouped Conv input columns, attention head columns of out_proj).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.ir.graph import const_value
from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.prune import shrink
from onnxforge.passes.prune.dependency import analyze
from onnxforge.passes.prune.shrink import param_count
from onnxforge.testing import numerics

import torch
nn = torch.nn
from onnxforge.testing import zoo


_copy = numerics.copy_model


assert_valid = numerics.assert_valid_model


def _export(module, example, dynamo: bool) -> ir.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            return zoo.export_model(module.eval(), (example,), opset=18, dynamo=dynamo)
        finally:
            logging.disable(logging.NOTSET)


def _prune(model: ir.Model, **options):
    return create_pass("prune-channels", options)(model).stats


def _zeroed_equivalent(original: ir.Model, pruned: ir.Model) -> ir.Model:
    """``original`` with every output channel a pruned layer dropped set to zero (weights and bias)."""
    out = _copy(original)
    nodes = {n.name: n for n in out.graph if n.name}
    n_zeroed = 0
    for node in pruned.graph:
        kept = node.meta.get(shrink.KEPT_META)
        if kept is None:
            continue
        orig = nodes[node.name]
        w = const_value(orig.inputs[1]).copy()
        out_axis = 0 if orig.op_type == "Conv" or (
            orig.op_type == "Gemm" and orig.attributes.get("transB") is not None
            and orig.attributes["transB"].value) else w.ndim - 1
        gone = np.setdiff1d(np.arange(w.shape[out_axis]), kept)
        index = [slice(None)] * w.ndim
        index[out_axis] = gone
        w[tuple(index)] = 0
        shrink.set_constant(orig.inputs[1], w)
        bias = orig.inputs[2] if orig.op_type in ("Conv", "Gemm") and len(orig.inputs) > 2 else None
        if orig.op_type == "MatMul":  # exporters write Linear on 3-D input as MatMul + Add(bias)
            (add,) = orig.outputs[0].consumers()
            bias = next(v for v in add.inputs if v is not orig.outputs[0])
        if bias is not None:
            b = const_value(bias).copy()
            b[..., gone] = 0
            shrink.set_constant(bias, b)
        n_zeroed += len(gone)
    assert n_zeroed > 0
    return out


# --- grouped convolutions ----------------------------------------------------------------------------


class ResNeXtBlock(nn.Module):
    """A ResNeXt bottleneck (1x1 -> grouped 3x3 with 4 groups -> 1x1, residual) and a second grouped
    Conv with 8 groups and fewer output than input channels; no BatchNorm, so zeroing a filter
    zeroes its channel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.reduce = nn.Conv2d(32, 64, 1)
        self.grouped = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.expand = nn.Conv2d(64, 32, 1)
        self.grouped2 = nn.Conv2d(32, 16, 3, padding=1, stride=2, groups=8)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.relu(self.reduce(s))
        y = torch.relu(self.grouped(y))
        y = torch.relu(self.expand(y) + s)
        y = torch.relu(self.grouped2(y))
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def resnext(request):
    return _export(ResNeXtBlock(), torch.randn(1, 3, 8, 8), dynamo=request.param)


def _conv(model: ir.Model, weight_name: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Conv" and n.inputs[1].name == weight_name)


def test_grouped_conv_analysis_ties_positions_across_groups(resnext):
    dep = analyze(resnext)
    space = next(s for s in dep.spaces if s.node is _conv(resnext, "grouped.weight"))
    roots = dep.roots()[space.elems].reshape(4, 16)
    # Output position j of every group is one class; the classes of different positions differ.
    assert (roots == roots[0]).all() and len(set(roots[0].tolist())) == 16
    group = next(g for g in dep.groups() if space in g.spaces)
    assert len(group.classes) == 16 and not group.blocked
    # The input side: reduce's 64 channels form 16 classes of 4 (one per group).
    reduce_space = next(s for s in dep.spaces if s.node is _conv(resnext, "reduce.weight"))
    assert len(set(dep.roots()[reduce_space.elems].tolist())) == 16
    reasons = " ".join(r for g in dep.groups() for r in g.blocked.values())
    assert "grouped Conv" not in reasons


def test_grouped_conv_prunes_uniformly_and_equals_zeroing(resnext):
    model = _copy(resnext)
    before = param_count(model)
    stats = _prune(model, ratio=0.3)
    assert_valid(model)
    assert not any("grouped" in s.reason for s in stats.skipped)
    g1, g2 = _conv(model, "grouped.weight"), _conv(model, "grouped2.weight")
    # 16 positions per group -> 4 go, in every group, on both sides; group stays.
    assert g1.inputs[1].const_value.shape == (48, 12, 3, 3)
    assert g1.attributes["group"].value == 4
    # grouped2: 8 groups of 4 inputs (the residual stream, 4 classes -> 1 goes) and 2 outputs
    # (2 classes -> floor(0.3 * 2) = 0 go).
    assert g2.inputs[1].const_value.shape == (16, 3, 3, 3)
    assert g2.attributes["group"].value == 8
    assert _conv(model, "reduce.weight").inputs[1].const_value.shape == (48, 24, 1, 1)
    assert _conv(model, "stem.weight").inputs[1].const_value.shape == (24, 3, 3, 3)
    assert stats.details["params_after"] == param_count(model) < 0.65 * before
    feeds = numerics.random_inputs(resnext)
    assert numerics.run(model, feeds)[0].shape == numerics.run(resnext, feeds)[0].shape
    numerics.assert_outputs_close(_zeroed_equivalent(resnext, model), model, feeds, rtol=1e-4, atol=1e-5)


def test_grouped_conv_reconstruct_runs(resnext):
    from onnxforge.runtime.data import CalibrationData

    rng = np.random.default_rng(0)
    name = resnext.graph.inputs[0].name
    calib = CalibrationData.from_iterable([{name: rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}
                                           for _ in range(2)])
    student = _copy(resnext)
    ctx = PassContext(calibration_data=calib, reference_model=resnext, seed=0)
    create_pass("prune-channels", {"ratio": 0.3}, ctx)(student)
    stats = create_pass("reconstruct", {}, ctx)(student).stats
    assert_valid(student)
    rows = {row["layer"]: row for row in stats.details["layers"]}
    grouped = rows[_conv(student, "grouped.weight").name]
    assert grouped["groups"] == 4 and grouped["error_after"] <= grouped["error_before"]


# --- torch.nn.MultiheadAttention: packed q/k/v in-projection ------------------------------------------


class MHA(nn.Module):
    """Linear -> MultiheadAttention (E=32, 4 heads, batch_first) -> Linear; no LayerNorm, so the
    in-projection's heads and the out-projection's outputs are both prunable."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(torch.relu(a))


@pytest.fixture(scope="module")
def mha_dynamo():
    return _export(MHA(), torch.randn(2, 5, 8), dynamo=True)


def _in_proj(model: ir.Model) -> ir.Node:
    """The MatMul of the packed q/k/v projection: its bias Add reads ``mha.in_proj_bias``."""
    return next(n for n in model.graph if n.op_type == "MatMul" and any(
        v.name == "mha.in_proj_bias" for u in n.outputs[0].consumers() for v in u.inputs))


def test_mha_dynamo_prunes_whole_heads_and_equals_zeroing(mha_dynamo):
    model = _copy(mha_dynamo)
    before = param_count(model)
    stats = _prune(model, ratio=0.3)
    assert_valid(model)
    # 4 heads of 8 -> 3: the in-projection keeps 3 heads in each of its q, k, v thirds.
    w = const_value(_in_proj(model).inputs[1])
    assert w.shape[1] == 3 * 24, w.shape
    kept = _in_proj(model).meta[shrink.KEPT_META]
    heads = {int(c) % 32 // 8 for c in np.setdiff1d(np.arange(96), kept)}
    assert len(heads) == 1  # one whole head, the same in q, k and v
    removed = np.setdiff1d(np.arange(96), kept)
    assert sorted(removed.tolist()) == sorted((np.arange(8) + 8 * heads.pop() + np.array([[0], [32], [64]])).ravel().tolist())
    out_proj = next(n for n in model.graph if n.op_type == "Gemm")
    assert out_proj.inputs[1].const_value.shape[1] == 24  # out_proj input columns of the head
    assert any(g["channels"] == 4 and g["removed"] == 1 for g in stats.details["groups"])
    assert stats.details["params_after"] == param_count(model) < before
    feeds = numerics.random_inputs(mha_dynamo)
    assert numerics.run(model, feeds)[0].shape == numerics.run(mha_dynamo, feeds)[0].shape
    # Other batch sizes still work (the batch x heads entries of the head reshapes are inferred).
    for batch in (1, 3):
        f = numerics.random_inputs(mha_dynamo, default_dim=batch, seed=batch)
        numerics.assert_outputs_close(_zeroed_equivalent(mha_dynamo, model), model, f, rtol=1e-4, atol=1e-5)


def test_transformer_encoder_layer_dynamo_prunes_heads_and_ffn():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    original = _export(layer, torch.randn(2, 5, 32), dynamo=True)
    model = _copy(original)
    before = param_count(model)
    stats = _prune(model, ratio=0.3)
    assert_valid(model)
    rows = stats.details["groups"]
    assert any(g["channels"] == 4 and g["removed"] == 1 for g in rows), rows  # one head of 4
    assert any(g["channels"] == 64 and g["removed"] == 19 for g in rows), rows  # the feed-forward
    # The residual stream (LayerNorm'd) is not pruned, and says why.
    assert any("LayerNorm" in s.reason or "graph output" in s.reason for s in stats.skipped)
    # in_proj: 3*32*32 -> 3*24*32 (+ bias), out_proj: 32x32 -> 32x24, FFN 2*64*32 -> 2*45*32 (+ bias).
    assert before - param_count(model) == 3 * 8 * 32 + 3 * 8 + 32 * 8 + 2 * 19 * 32 + 19
    feeds = numerics.random_inputs(original, default_dim=3)
    numerics.assert_outputs_close(_zeroed_equivalent(original, model), model, feeds, rtol=1e-4, atol=1e-5)


def test_mha_torchscript_stays_unpruned_with_a_reason():
    # The TorchScript exporter computes head_dim = E // heads and the unflatten shape from Shape at
    # run time: not provably safe, so the attention is left alone and says why.
    model = _export(MHA(), torch.randn(2, 5, 8), dynamo=False)
    reference = _copy(model)
    stats = _prune(model, ratio=0.3)
    reasons = {s.node.name if not isinstance(s.node, str) else s.node: s.reason for s in stats.skipped}
    in_proj = _in_proj(model)
    assert "computed at run time" in reasons[in_proj.name] or "Shape" in reasons[in_proj.name]
    assert const_value(in_proj.inputs[1]).shape == (32, 96)
    assert_valid(model)
    feeds = numerics.random_inputs(reference)
    numerics.assert_outputs_close(reference, model, feeds, rtol=1e-5, atol=1e-6)
