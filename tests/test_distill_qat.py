"""Quantization-aware distillation: ``quantize-int8,distill`` on the trained digits CNN.

The torch graph runner simulates a QDQ model (QuantizeLinear rounding in float, int8 weights as
float parameters on their grid) and writes the trained weights back as integers on the same scales.
Checked here: the runner matches onnxruntime on the quantized graph; an untrained round trip gives
back the very same integers; training lowers the int8 model's output error against fp32 on digits it
never saw (the 360 test digits; it trains on the training split) while the graph, its scales and
zero points stay as they are, and the model still runs in onnxruntime's integer kernels.

Bounds: the mean |logit error| vs fp32 on the test digits drops by at least 20 % (measured: see the
printed figures), and test accuracy stays within 0.3 points of the post-training int8 model's.
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.distill.graph_module import check, graph_module, write_back
from onnxforge.passes import PassContext, create_pass
from onnxforge.testing import digits

MODEL = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"


def _copy(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


@pytest.fixture(scope="module")
def setup():
    if not MODEL.exists():
        pytest.skip("examples/digits_cnn.onnx is missing")
    model, calib, x_test, y_test = digits.bundled_model_and_data()
    int8 = _copy(model)
    # per-tensor, 7-bit weights: a visibly lossy int8 model, so there is an error to recover
    create_pass("quantize-int8", {"per_channel": False, "reduce_range": True},
                PassContext(calibration_data=calib))(int8)
    return model, calib, x_test, y_test, int8


def _logits(model, x):
    from onnxforge.runtime.session import make_session

    sess = make_session(model, ("cpu",), optimize="all")
    name = model.graph.inputs[0].name
    return np.asarray(sess.run({name: x})[model.graph.outputs[0].name], np.float64)


def _constants(model):
    """Scales and zero points (every non-integer-weight input of Q/DQ nodes), by name."""
    out = {}
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for v in node.inputs[1:]:
                if v is not None and v.const_value is not None:
                    out[v.name] = v.const_value.numpy().copy()
    return out


def test_runner_matches_onnxruntime_and_round_trips_the_integers(setup):
    _, calib, _, _, int8 = setup
    module = graph_module(int8)
    assert module.quantized, "no quantized weight became a parameter"
    feeds = next(iter(calib))
    err = check(module, int8, feeds)
    assert err < 1e-3, err
    back = write_back(module, int8)
    for name in module.quantized:
        old = int8.graph.initializers[name].const_value.numpy()
        new = back.graph.initializers[name].const_value.numpy()
        assert new.dtype == old.dtype and np.array_equal(new, old), name


def test_qat_lowers_the_int8_error_on_unseen_digits(setup):
    model, calib, x_test, y_test, int8 = setup
    student = _copy(int8)
    ops = [(n.op_type, n.name) for n in student.graph]
    consts = _constants(student)
    ctx = PassContext(calibration_data=calib, reference_model=model, seed=0)
    result = create_pass("distill", {"epochs": 6, "lr": 1e-3, "loss": "mse", "batch_size": 64}, ctx)(student)
    assert result.modified and result.stats.counts["tensors_trained"] > 0
    # the quantized graph is the same: nodes, names, scales and zero points; only the integers moved
    assert [(n.op_type, n.name) for n in student.graph] == ops
    after = _constants(student)
    assert consts.keys() == after.keys() and all(np.array_equal(consts[k], after[k]) for k in consts)
    ref = _logits(model, x_test)
    ptq_err = float(np.abs(_logits(int8, x_test) - ref).mean())
    qat_err = float(np.abs(_logits(student, x_test) - ref).mean())
    acc_fp32 = digits.accuracy(model, x_test, y_test)
    acc_ptq, acc_qat = digits.accuracy(int8, x_test, y_test), digits.accuracy(student, x_test, y_test)
    print(f"\ndigits int8 (per tensor, 7-bit): |logit error| {ptq_err:.4f} -> QAT {qat_err:.4f}; "
          f"accuracy fp32 {acc_fp32:.4f} int8 {acc_ptq:.4f} QAT {acc_qat:.4f}")
    assert qat_err <= 0.8 * ptq_err, (ptq_err, qat_err)
    assert acc_qat >= acc_ptq - 0.003, (acc_ptq, acc_qat)


def test_runner_runs_an_exported_quantized_upsample_split_net():
    """Resize (nearest x2, and bilinear) and Split as the exporter writes them, quantized: the runner
    matches onnxruntime and its gradients reach every trained int8 weight."""
    torch = pytest.importorskip("torch")
    from onnxforge.torch_export import export

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.c = torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            near = torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")
            lin = torch.nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            p, q = torch.split(near + lin, [4, 4], dim=1)
            return self.b(p) * torch.sigmoid(self.c(q))

    torch.manual_seed(0)
    model = export(Net().eval(), (torch.randn(2, 3, 8, 8),))
    ops = {n.op_type for n in model.graph}
    assert {"Resize", "Split"} <= ops, ops
    rng = np.random.default_rng(0)
    name = model.graph.inputs[0].name
    calib = [{name: rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    int8 = _copy(model)
    create_pass("quantize-int8", {}, PassContext(calibration_data=calib))(int8)
    module = graph_module(int8)
    assert len(module.quantized) >= 6  # 3 weights, 3 biases
    assert check(module, int8, calib[0]) < 0.02
    out = module(torch.from_numpy(calib[1][name]))[0]
    out.square().mean().backward()
    grads = [module.params[k].grad for k in module.param_names.values()]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_distill_picks_the_qat_learning_rate_for_a_quantized_student(setup):
    from onnxforge.passes.prune.distill import FLOAT_LR, QAT_LR

    model, calib, _, _, int8 = setup
    for student, lr, quantized in ((_copy(int8), QAT_LR, True), (_copy(model), FLOAT_LR, False)):
        ctx = PassContext(calibration_data=calib, reference_model=model, seed=0)
        result = create_pass("distill", {"epochs": 1, "loss": "mse", "batch_size": 128}, ctx)(student)
        assert result.stats.details["lr"] == lr and result.stats.details["quantization_aware"] is quantized
    with pytest.raises(Exception, match="loss"):
        create_pass("distill", {"loss": "l1"}, PassContext())
