"""Presets as a user runs them, on the graphs real exporters write.

O1 must never change outputs beyond fp32 rounding, whatever the exporter: torch's dynamo exporter,
its TorchScript exporter at opset 11, and weights stored as Constant nodes (PaddlePaddle-style).
"""

from __future__ import annotations

import pytest

import onnxforge
from onnxforge.testing import numerics, zoo

CASES = [
    ("digits_cnn", "dynamo"),
    ("mobilenetv3_style", "dynamo"),
    ("yolo_style", "dynamo"),
    ("densenet_style", "dynamo"),
    ("bert_encoder", "dynamo"),
    ("mobilenetv2_style", "opset11-constants"),
    ("bert_encoder", "opset11-constants"),
]


def _model(zoo_model, name, flavour):
    if flavour == "dynamo":
        return zoo_model(name)
    return zoo.constants_as_nodes(zoo_model(name, opset=11, dynamo=False))


@pytest.mark.parametrize("name, flavour", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_o1_is_lossless_on_exported_graphs(zoo_model, name, flavour):
    original = _model(zoo_model, name, flavour)
    model = _model(zoo_model, name, flavour)
    result = onnxforge.optimize(model, "O1", verify=True)
    optimized = result.model
    # verify=True already checked every pass; check the end result independently on other inputs.
    dims = {"batch": 3, "seq": 11}
    feeds = numerics.random_inputs(original, seed=1, dim_values=dims, default_dim=3)
    numerics.assert_outputs_close(original, optimized, feeds, rtol=1e-4, atol=1e-5)
    before, after = result.report.before, result.report.after
    assert after["nodes"] <= before["nodes"]
    assert numerics.op_count(optimized, "BatchNormalization") <= numerics.op_count(original, "BatchNormalization")
    if name != "densenet_style":  # its BatchNorms follow Concat, not a Conv: nothing to fold into
        assert numerics.op_count(optimized, "BatchNormalization") == 0
    assert numerics.op_count(optimized, "Constant") == 0
    assert not optimized.graph.inputs[0].name.startswith("_")  # interface names are kept
    assert [v.name for v in optimized.graph.outputs] == [v.name for v in original.graph.outputs]


def test_o1_report_says_why_densenet_batchnorm_stays(zoo_model):
    result = onnxforge.optimize(zoo_model("densenet_style"), "O1")
    (record,) = [r for r in result.report.records if r.name == "fold-batchnorm"]
    reasons = {s["reason"] for s in record.stats["skipped"] if s["op_type"] == "BatchNormalization"}
    assert reasons, "BatchNorms left alone must be reported with a reason"


def test_o1_is_deterministic(zoo_model):
    a = onnxforge.optimize(zoo_model("mobilenetv3_style"), "O1").model
    b = onnxforge.optimize(zoo_model("mobilenetv3_style"), "O1").model
    from onnxforge.ir.io import model_to_bytes

    assert model_to_bytes(a) == model_to_bytes(b)


def test_o2_fuses_the_encoder_and_keeps_outputs(zoo_model):
    original = zoo_model("bert_encoder")
    result = onnxforge.optimize(zoo_model("bert_encoder"), "O2", verify=True)
    assert numerics.op_count(result.model, "Attention", "com.microsoft") == 2
    for seq in (16, 37):
        feeds = numerics.random_inputs(original, seed=seq, dim_values={"batch": 2, "seq": seq})
        numerics.assert_outputs_close(original, result.model, feeds, rtol=1e-4, atol=1e-5)


def test_o2_for_plain_onnx_has_no_contrib_ops(zoo_model):
    result = onnxforge.optimize(zoo_model("bert_encoder"), "O2", target="onnx", verify=True)
    assert not any(n.domain == "com.microsoft" for n in result.model.graph)


def test_o3_refuses_without_calibration_data(zoo_model):
    from onnxforge.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="calibration"):
        onnxforge.optimize(zoo_model("digits_cnn"), "O3")
