"""Pruning through squeeze-excitation and depthwise convs (EfficientNet / MobileNetV3 blocks) is exact.

Issue 12 asked whether effnet's 0.00 top-1 agreement after pruning was a channel-mapping bug. The
property tested here rules that out on real exported graphs: removing channel class ``c`` must give
*exactly* the function of the unpruned model with every consumer's input column of ``c`` set to zero
(a channel nobody reads). If a depthwise filter, an SE gate, a BatchNorm or a residual stream were
sliced at the wrong positions, the two would differ.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.ir.graph import const_value
from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.prune import shrink
from onnxforge.passes.prune.dependency import analyze
from onnxforge.testing.numerics import run_named as run


def _copy(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _effnet_lite_blocks():
    """Two EfficientNet-Lite stages (expand 1x1 -> depthwise 5x5 -> ReLU6 -> project, residual), and
    one block with squeeze-excitation and HardSwish, at 32x32."""
    from onnxforge.torch_export import import_torch

    torch = import_torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, k, stride, se):
            super().__init__()
            mid = cin * 4
            self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6())
            self.dw = nn.Sequential(nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
                                    nn.BatchNorm2d(mid), nn.Hardswish() if se else nn.ReLU6())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, 8, 1), nn.ReLU(),
                                    nn.Conv2d(8, mid, 1), nn.Hardsigmoid()) if se else None
            self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            y = self.dw(self.expand(x))
            if self.se is not None:
                y = y * self.se(y)
            y = self.project(y)
            return x + y if self.skip else y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
            self.blocks = nn.Sequential(Block(16, 24, 3, 2, False), Block(24, 24, 5, 1, False),
                                        Block(24, 32, 5, 1, True), Block(32, 32, 3, 1, True))
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # trained-looking BatchNorms: statistics and affine far from identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def models():
    from onnxforge.testing import zoo
    from onnxforge.torch_export import export, import_torch

    torch = import_torch()
    effnet_like = export(_effnet_lite_blocks(), (torch.randn(2, 3, 32, 32),))
    return {"effnet_lite_blocks": effnet_like, "mobilenetv3_style": zoo.export_cached("mobilenetv3_style")}


def _masked_original(model: ir.Model, removed: set[int]) -> ir.Model:
    """The unpruned model with every consumer input column of the removed classes set to zero."""
    masked = _copy(model)
    dep = analyze(masked)
    gone = np.isin(dep.roots(), np.fromiter(removed, dtype=np.int64))
    zeroed = 0
    for cut in dep.cuts:
        if cut.kind == "param" and cut.role == "in_weight" and gone[cut.elems].any():
            arr = np.array(const_value(cut.value), copy=True)
            index = [slice(None)] * arr.ndim
            index[cut.axis] = gone[cut.elems]
            arr[tuple(index)] = 0.0
            shrink.set_constant(cut.value, arr)
            zeroed += 1
    assert zeroed, "nothing was masked: the test would prove nothing"
    return masked


@pytest.mark.parametrize("name", ["effnet_lite_blocks", "mobilenetv3_style"])
@pytest.mark.parametrize("options", [{"ratio": 0.3}, {"target_flops": 0.7}])
def test_pruned_equals_masked_original(models, name, options, monkeypatch):
    model = models[name]
    captured = {}
    real_apply = shrink.apply

    def spy(dep, removed):
        captured["removed"] = set(removed)
        return real_apply(dep, removed)

    monkeypatch.setattr(shrink, "apply", spy)
    pruned = _copy(model)
    result = create_pass("prune-channels", options, PassContext(seed=0))(pruned)
    assert result.modified
    ops = [n.op_type for n in model.graph]
    assert "Conv" in ops and any(n.op_type == "Conv" and n.attributes.get("group") is not None
                                 and n.attributes["group"].value > 1 for n in model.graph)
    # The cut reached depthwise convs (their group attribute shrank) and the residual streams.
    assert result.stats.counts.get("groups_rewritten", 0) > 0
    masked = _masked_original(model, captured["removed"])
    feeds = {model.graph.inputs[0].name: np.random.default_rng(0).standard_normal(
        (2, 3, 32, 32) if name == "effnet_lite_blocks" else (2, 3, 64, 64)).astype(np.float32)}
    got, want, orig = run(pruned, feeds), run(masked, feeds), run(model, feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4 * (1 + np.abs(want[key]).max()))
        assert np.abs(got[key] - orig[key]).max() > 1e-3  # the cut did change the function


def test_graph_runner_matches_onnxruntime_on_se_and_depthwise(models):
    """The torch runner used by ``distill`` computes the same function as onnxruntime."""
    from onnxforge.distill.graph_module import check, graph_module

    for name, model in models.items():
        shape = (2, 3, 32, 32) if name == "effnet_lite_blocks" else (2, 3, 64, 64)
        feeds = {model.graph.inputs[0].name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        assert check(graph_module(model), model, feeds, rtol=1e-5) <= 1e-5


def test_sensitivity_criterion_weighs_groups_by_measured_output_change(models):
    from onnxforge.errors import CalibrationDataError
    from onnxforge.passes.prune.group_sensitivity import group_weights
    from onnxforge.passes.prune.importance import class_scores

    model = models["effnet_lite_blocks"]
    rng = np.random.default_rng(2)
    feeds = [{model.graph.inputs[0].name: rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    dep = analyze(model)
    groups = dep.groups()
    scores, _ = class_scores(dep, "l1", PassContext())
    before = ir.serde.serialize_model(model).SerializeToString()
    weights, raw = group_weights(model, dep, groups, scores, feeds)
    assert ir.serde.serialize_model(model).SerializeToString() == before  # masks were undone
    prunable = [g.index for g in groups if len(g.classes)]
    assert sorted(weights) == sorted(prunable) and all(raw[g] >= 0 for g in prunable)
    assert sum(raw[g] > 0 for g in prunable) > len(prunable) // 2
    assert np.median([w for w in weights.values() if w > 0]) == pytest.approx(1.0)
    # The measured error of a group is that of the masked model, recomputed here for one group.
    g = groups[max(prunable, key=lambda i: raw[i])]
    k = int(np.ceil(0.25 * len(g.all_classes)))
    gone = sorted(g.classes.tolist(), key=lambda r: (scores.get(r, 0.0), r))[:k]
    masked = _masked_original(model, set(gone))
    err = np.mean([sum(np.sum((run(masked, f)[n].astype(np.float64) - run(model, f)[n]) ** 2)
                       / np.sum(run(model, f)[n].astype(np.float64) ** 2) for n in run(model, f)) for f in feeds])
    assert raw[g.index] == pytest.approx(err, rel=1e-3)

    pruned = _copy(model)
    result = create_pass("prune-channels", {"target_flops": 0.7, "criterion": "sensitivity"},
                         PassContext(calibration_data=feeds))(pruned)
    details = result.stats.details
    assert details["flops_after"] <= 0.7 * details["flops_before"] and "group_sensitivity" in details
    with pytest.raises(CalibrationDataError, match="sensitivity"):
        create_pass("prune-channels", {"target_flops": 0.7, "criterion": "sensitivity"}, PassContext())(_copy(model))
