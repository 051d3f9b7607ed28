"""What the distillation loss compares, output by output (``distill(loss=auto)``).

``auto`` picks per graph output: KL on the logits of a ``Softmax`` output, the binary KL on a
``Sigmoid``'s probabilities (a detector's class scores, also through Transpose/Reshape and the Q/DQ
pairs of a quantized student), the per-channel standardised MSE on anything else (boxes). Checked
here on an exported three-headed net, float and quantized; the binary KL's value and gradient
against its closed form; and a QAT run with ``loss=auto`` that lowers the int8 score error on inputs
it never trained on.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.distill.graph_kd import kd_loss_kinds, kd_targets
from onnxforge.passes import PassContext, create_pass
from onnxforge.testing.numerics import copy_model, random_inputs

torch = pytest.importorskip("torch")


class _Heads(torch.nn.Module):
    """A toy detector: class logits through a Softmax, sigmoid scores laid out as (N, anchors, classes),
    and raw box regressions."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
        self.cls = torch.nn.Conv2d(16, 5, 1)
        self.score = torch.nn.Conv2d(16, 4, 1)
        self.box = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x):
        f = self.body(x)
        probs = torch.softmax(self.cls(f).mean((2, 3)), dim=-1)
        scores = torch.sigmoid(self.score(f)).flatten(2).transpose(1, 2)
        boxes = self.box(f).flatten(2).transpose(1, 2)
        return probs, scores, boxes


@pytest.fixture(scope="module")
def heads():
    from onnxforge.torch_export import export

    torch.manual_seed(0)
    net = _Heads().eval()
    with torch.no_grad():
        net.score.bias.fill_(-1.0)  # scores spread around 0.1-0.5, as a detector's do
        # channel ranges 30x apart after the first conv: per-tensor int8 activations lose the small ones
        net.body[0].weight[:8] *= 30.0
        net.body[0].bias[:8] *= 30.0
        net.body[2].weight[:, :8] /= 30.0
    model = export(net, (torch.randn(2, 3, 8, 8),))
    feeds = [random_inputs(model, seed=i, default_dim=4) for i in range(48)]
    return model, feeds


def test_auto_picks_kl_bce_mse_by_what_each_output_is(heads):
    model, feeds = heads
    int8 = copy_model(model)
    create_pass("quantize-int8", {}, PassContext(calibration_data=feeds[:8]))(int8)
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph)
    for m in (model, int8):
        targets = kd_targets(m)
        assert kd_loss_kinds(m, targets, "auto") == ["kl", "bce", "mse"]
        assert kd_loss_kinds(m, targets, "mse") == ["mse"] * 3


def test_binary_kl_value_and_gradient():
    """KL(t || s) summed over the last axis, mean over the rest; d/d(logit) = (s - t) / positions."""
    from onnxforge.distill.train import _binary_kl

    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.uniform(0.01, 0.99, (3, 7, 4)))
    z = torch.from_numpy(rng.standard_normal((3, 7, 4))).requires_grad_(True)
    s = torch.sigmoid(z)
    loss = _binary_kl(s, t, torch)
    tn, sn = t.numpy(), s.detach().numpy()
    expect = (tn * np.log(tn / sn) + (1 - tn) * np.log((1 - tn) / (1 - sn))).sum(-1).mean()
    assert float(loss.detach()) == pytest.approx(expect, rel=1e-9)
    loss.backward()
    np.testing.assert_allclose(z.grad.numpy(), (sn - tn) / 21, rtol=1e-6, atol=1e-12)
    assert float(_binary_kl(t, t, torch)) == pytest.approx(0.0, abs=1e-12)


def test_qat_with_auto_loss_lowers_the_int8_error_on_unseen_inputs(heads):
    """quantize-int8 (per tensor, 7-bit: visibly lossy), then distill(loss=auto): on 16 inputs it never
    saw, no output's mean |error| against the float model grows, and their mean falls by at least 20 %
    (measured: class probabilities to ~0.45 of the int8 error, scores ~0.9, boxes ~0.85)."""
    from onnxforge.runtime.session import make_session

    model, feeds = heads
    train, held = feeds[:32], feeds[32:]
    int8 = copy_model(model)
    create_pass("quantize-int8", {"per_channel": False, "reduce_range": True},
                PassContext(calibration_data=train))(int8)
    ctx = PassContext(calibration_data=train, reference_model=model, seed=0)
    student = copy_model(int8)
    options = {"loss": "auto", "epochs": 20, "patience": 20, "batch_size": 4, "lr": 1e-4}
    result = create_pass("distill", options, ctx)(student)
    assert sorted(result.stats.details["loss_kinds"].values()) == ["bce", "kl", "mse"]

    def outputs(m):
        sess = make_session(m, ("cpu",), optimize="all")
        runs = [sess.run(f) for f in held]
        return {o.name: np.concatenate([r[o.name] for r in runs]) for o in model.graph.outputs}

    ref, before, after = outputs(model), outputs(int8), outputs(student)
    ratios = {k: float(np.abs(after[k] - ref[k]).mean() / np.abs(before[k] - ref[k]).mean()) for k in ref}
    print(f"\nQAT(auto) |error| / int8 |error| per output: {ratios}")
    assert all(r <= 1.0 for r in ratios.values()), ratios
    assert np.mean(list(ratios.values())) <= 0.8, ratios


def test_a_quantized_softmax_input_is_read_before_its_qdq_pair():
    """PP-OCRv4's recognizer, quantized, rounds its logits (an ``Add``) with a Q/DQ pair before the
    Softmax: the KD target is the float logits, named as in the teacher, and a QAT run trains on it
    (it failed with 'the teacher has no value named ..._DequantizeLinear_out')."""
    from onnxforge.torch_export import export

    class Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 6)

        def forward(self, x):
            f = torch.relu(self.conv(x)).mean(2).transpose(1, 2)  # (N, T, C): a sequence
            return torch.softmax(self.fc(f) + 0.5, dim=-1)

    torch.manual_seed(0)
    teacher = export(Rec().eval(), (torch.randn(2, 3, 4, 8),))
    feeds = [random_inputs(teacher, seed=i, default_dim=2) for i in range(8)]
    student = copy_model(teacher)
    create_pass("quantize-int8", {"include_ops": ["Conv", "MatMul", "Gemm", "Add"]},
                PassContext(calibration_data=feeds))(student)
    softmax = next(n for n in student.graph if n.op_type == "Softmax")
    assert softmax.inputs[0].producer().op_type == "DequantizeLinear"  # the case this test is about
    logits = next(n for n in teacher.graph if n.op_type == "Softmax").inputs[0].name
    assert kd_targets(student) == [logits] and kd_loss_kinds(student, [logits], "auto") == ["kl"]
    ctx = PassContext(calibration_data=feeds, reference_model=teacher, seed=0)
    r = create_pass("distill", {"loss": "auto", "epochs": 1, "batch_size": 4}, ctx)(student)
    assert r.modified
