"""prune-channels through ``torch.chunk`` on the channel axis as the TorchScript exporter writes it.

``x.chunk(n, 1)`` becomes Slices whose bounds are computed at run time from ``Shape(x)``
(``Gather -> Add -> Div -> Mul``). When every part loses the same channels, the same arithmetic gives
the new parts, so the Slices stay as they are (see ``dependency.find_chunk``). The strongest check,
as in ``test_prune_grouped_mha``: the pruned model equals the unpruned one with the removed channels
zeroed (Conv weights and bias, and the BatchNorm scale and shift that follow, so that SiLU(BN(0)) = 0).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.ir.graph import const_value
from onnxforge.passes.prune import shrink
from onnxforge.passes.prune.dependency import analyze
from onnxforge.passes.prune.shrink import param_count
from onnxforge.testing import numerics

from test_prune_channels import _copy, assert_valid, exported, prune  # noqa: F401  (fixture)
from test_prune_grouped_mha import _zeroed_equivalent

import torch
nn = torch.nn
from onnxforge.testing import zoo


def _zeroed(original: ir.Model, pruned: ir.Model) -> ir.Model:
    """``_zeroed_equivalent``, plus the BatchNorm after each pruned Conv zeroed on the same channels."""
    out = _zeroed_equivalent(original, pruned)
    nodes = {n.name: n for n in out.graph if n.name}
    for node in pruned.graph:
        kept = node.meta.get(shrink.KEPT_META)
        if kept is None or node.op_type != "Conv":
            continue
        conv = nodes[node.name]
        gone = np.setdiff1d(np.arange(const_value(conv.inputs[1]).shape[0]), kept)
        for user in conv.outputs[0].consumers():
            if user.op_type == "BatchNormalization":
                for i in (1, 2):  # scale and shift
                    arr = const_value(user.inputs[i]).copy()
                    arr[gone] = 0
                    shrink.set_constant(user.inputs[i], arr)
    return out


def _check_pruned(original: ir.Model, model: ir.Model, stats, feeds_at) -> None:
    assert_valid(model)
    assert stats.details["params_after"] == param_count(model) < param_count(original)
    zeroed = _zeroed(original, model)
    for batch in (1, 3):
        feeds = feeds_at(batch)
        assert [o.shape for o in numerics.run(model, feeds)] == [o.shape for o in numerics.run(original, feeds)]
        numerics.assert_outputs_close(zeroed, model, feeds, rtol=1e-4, atol=1e-5)


def _no_chunk_blocks(stats) -> None:
    reasons = " ".join(s.reason for s in stats.skipped)
    assert "read by Shape" not in reasons and "not from a prunable layer" not in reasons, reasons
    assert "computed at run time" not in reasons, reasons


# --- the TorchScript YOLO export (C2f: cv1 -> chunk(2) -> bottleneck with residual -> Concat) ---------


C2F = ("s1/s1.1", "s2/s2.1", "s3/s3.1", "n4", "n3")


def test_yolo_torchscript_chunks_prune(exported):
    original = exported("yolo_style", dynamo=False, opset=17)
    model = _copy(original)
    assert sum(n.op_type == "Slice" for n in model.graph) == 10
    stats = prune(model, ratio=0.3)
    _no_chunk_blocks(stats)
    assert {s.reason for s in stats.skipped} == {f"reaches graph output 'output_{i}'" for i in range(3)}
    rows = stats.details["groups"]
    for block in C2F:
        # cv1's two halves and the bottleneck's residual (m.0.cv2) are one group of C/2 classes.
        cv1, m_cv2 = f"/{block}/cv1/cv1.0/Conv", f"/{block}/m.0/cv2/cv2.0/Conv"
        row = next(r for r in rows if cv1 in r["layers"])
        assert m_cv2 in row["layers"] and not row["blocked"], row
        w0 = const_value(next(n for n in original.graph if n.name == cv1).inputs[1])
        w1 = const_value(next(n for n in model.graph if n.name == cv1).inputs[1])
        assert row["channels"] == w0.shape[0] // 2 and row["removed"] == int(0.3 * row["channels"])
        assert w1.shape[0] == w0.shape[0] - 2 * row["removed"]
        # The Slices are left as they are: they recompute their bounds from the new shape.
    assert sum(n.op_type == "Slice" for n in model.graph) == 10
    assert stats.counts["groups_pruned"] == 22
    _check_pruned(original, model, stats, lambda b: zoo.feeds("yolo_style", batch=b, seed=b))


def test_yolo_torchscript_kept_positions_match_across_parts(exported):
    original = exported("yolo_style", dynamo=False, opset=17)
    model = _copy(original)
    prune(model, ratio=0.5)
    for block in C2F:
        name = f"/{block}/cv1/cv1.0/Conv"
        half = const_value(next(n for n in original.graph if n.name == name).inputs[1]).shape[0] // 2
        kept = np.sort(next(n for n in model.graph if n.name == name).meta[shrink.KEPT_META])
        # Channel j of the first half is kept iff channel C/2 + j of the second half is.
        np.testing.assert_array_equal(kept[kept < half], kept[kept >= half] - half)
        assert len(kept) == half  # ratio 0.5 of the C/2 classes


# --- a tiny module: chunk(2) with a residual, and chunk(3) whose parts are reordered and gated ------


class Chunks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.cv1 = nn.Conv2d(8, 16, 1)
        self.m = nn.Conv2d(8, 8, 3, padding=1)
        self.cv2 = nn.Conv2d(24, 12, 1)
        self.out = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        a, b = torch.relu(self.cv1(s)).chunk(2, 1)
        b = b + torch.relu(self.m(b))
        z = torch.relu(self.cv2(torch.cat([a, b, b * a], 1)))
        p, q, r = z.chunk(3, 1)
        return self.out(torch.cat([r, p, q * torch.sigmoid(r)], 1)).mean((2, 3))


def _export(module, dynamo: bool = False) -> ir.Model:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            return zoo.export_model(module.eval(), (torch.randn(1, 3, 8, 8),), opset=17, dynamo=dynamo)
        finally:
            logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def chunks():
    return _export(Chunks())


def _conv(model: ir.Model, weight: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Conv" and n.inputs[1].name == weight)


def test_chunk_analysis_ties_position_j_of_every_part(chunks):
    dep = analyze(chunks)
    roots = dep.roots()
    cv1 = next(s for s in dep.spaces if s.node is _conv(chunks, "cv1.weight"))
    cv2 = next(s for s in dep.spaces if s.node is _conv(chunks, "cv2.weight"))
    r1 = roots[cv1.elems].reshape(2, 8)
    r2 = roots[cv2.elems].reshape(3, 4)
    assert (r1 == r1[0]).all() and len(set(r1[0].tolist())) == 8
    assert (r2 == r2[0]).all() and len(set(r2[0].tolist())) == 4
    groups = {g.index: g for g in dep.groups()}
    g1 = next(g for g in groups.values() if cv1 in g.spaces)
    assert _conv(chunks, "m.weight") in [s.node for s in g1.spaces]  # the residual joins the chunk
    assert not g1.blocked and not next(g for g in groups.values() if cv2 in g.spaces).blocked


def test_chunk_prunes_equal_parts_and_equals_zeroing(chunks):
    model = _copy(chunks)
    stats = prune(model, ratio=0.3)
    _no_chunk_blocks(stats)
    # cv1: 8 classes of 2 (+ m) -> 2 go from each half; cv2: 4 classes of 3 -> 1 goes from each third.
    assert const_value(_conv(model, "cv1.weight").inputs[1]).shape[0] == 12
    assert const_value(_conv(model, "m.weight").inputs[1]).shape[:2] == (6, 6)
    assert const_value(_conv(model, "cv2.weight").inputs[1]).shape == (9, 18, 1, 1)
    assert const_value(_conv(model, "out.weight").inputs[1]).shape == (5, 9, 1, 1)
    rows = stats.details["groups"]
    assert any(r["channels"] == 8 and r["removed"] == 2 and not r["blocked"] for r in rows), rows
    assert any(r["channels"] == 4 and r["removed"] == 1 and not r["blocked"] for r in rows), rows
    kept = np.asarray(_conv(model, "cv2.weight").meta[shrink.KEPT_META])
    assert (kept.reshape(3, 3) % 4 == (kept[:3] % 4)).all()  # the same position in each third
    _check_pruned(chunks, model, stats, lambda b: numerics.random_inputs(chunks, default_dim=b, seed=b))


class Uneven(nn.Module):
    """chunk(3) of 8 channels is 3 + 3 + 2: no equal-count pruning keeps that arithmetic."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        p, q, r = torch.relu(self.cv(x)).chunk(3, 1)
        return self.out(torch.cat([r, q, p], 1)).mean((2, 3))


def test_uneven_chunk_stays_blocked_with_a_reason():
    original = _export(Uneven())
    model = _copy(original)
    stats = prune(model, ratio=0.3)
    assert const_value(_conv(model, "cv.weight").inputs[1]).shape[0] == 8
    reasons = {s.reason for s in stats.skipped}
    assert any("read by Shape" in r and "equal parts" in r for r in reasons), reasons
    assert_valid(model)
    feeds = numerics.random_inputs(original)
    numerics.assert_outputs_close(original, model, feeds, rtol=1e-5, atol=1e-6)


class SecondHalf(nn.Module):
    """``y[:, y.shape[1] // 2:]``: one run-time Slice, the second of 2 parts; the first half is read
    whole by another Conv, so its channels go in pairs (j, C/2 + j) too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        h = y[:, y.shape[1] // 2:]
        return (self.b(torch.cat([h, h], 1)) + self.c(y)).mean((2, 3))


def test_partial_run_time_slice_prunes_pairs():
    original = _export(SecondHalf())
    model = _copy(original)
    stats = prune(model, ratio=0.5)
    _no_chunk_blocks(stats)
    kept = np.sort(_conv(model, "a.weight").meta[shrink.KEPT_META])
    assert len(kept) == 4
    np.testing.assert_array_equal(kept[kept < 4], kept[kept >= 4] - 4)
    _check_pruned(original, model, stats, lambda b: numerics.random_inputs(original, default_dim=b, seed=b))
