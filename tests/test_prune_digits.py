"""prune-channels + reconstruct on the trained digits CNN: accuracy numbers, not just validity."""

from __future__ import annotations

import pathlib

import onnx
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass

digits = pytest.importorskip("onnxforge.testing.digits")
pytest.importorskip("sklearn")

MODEL = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def setup():
    if not MODEL.exists():
        pytest.skip("examples/digits_cnn.onnx is missing")
    from onnxforge.runtime.data import CalibrationData

    x_train, _, x_test, y_test = digits.load_digits_split()
    model = ir.serde.deserialize_model(onnx.load(str(MODEL)))
    name = model.graph.inputs[0].name
    calib = CalibrationData.from_iterable([{name: x_train[i : i + 128]} for i in range(0, len(x_train), 128)])
    return model, calib, x_test, y_test


def _copy(model):
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _prune(model, calib, ratio, criterion):
    student = _copy(model)
    ctx = PassContext(calibration_data=calib, reference_model=model, seed=0)
    create_pass("prune-channels", {"ratio": ratio, "criterion": criterion}, ctx)(student)
    return student, ctx


def test_reconstruct_recovers_accuracy(setup):
    model, calib, x_test, y_test = setup
    fp32 = digits.accuracy(model, x_test, y_test)
    student, ctx = _prune(model, calib, 0.5, "l1")
    pruned = digits.accuracy(student, x_test, y_test)
    result = create_pass("reconstruct", {}, ctx)(student)
    recovered = digits.accuracy(student, x_test, y_test)
    print(f"\ndigits: fp32 {fp32:.4f}  pruned(0.5, l1) {pruned:.4f}  + reconstruct {recovered:.4f}")
    layers = result.stats.details["layers"]
    assert all(row["error_after"] <= row["error_before"] for row in layers)
    assert any(row["error_after"] < 0.8 * row["error_before"] for row in layers)
    assert recovered > pruned + 0.2
    assert recovered >= fp32 - 0.02, (fp32, pruned, recovered)


def test_l1_beats_random(setup):
    model, calib, x_test, y_test = setup
    acc = {c: digits.accuracy(_prune(model, calib, 0.3, c)[0], x_test, y_test) for c in ("l1", "random")}
    print(f"\ndigits at ratio 0.3, no reconstruction: l1 {acc['l1']:.4f}  random {acc['random']:.4f}")
    assert acc["l1"] > acc["random"] + 0.1, acc


def test_reconstruct_needs_teacher_and_data(setup):
    from onnxforge.errors import CalibrationDataError, PassOptionError

    model, calib, _, _ = setup
    with pytest.raises(PassOptionError, match="teacher"):
        create_pass("reconstruct", {}, PassContext(calibration_data=calib))(_copy(model))
    with pytest.raises(CalibrationDataError):
        create_pass("reconstruct", {}, PassContext(reference_model=model))(_copy(model))


def test_reconstruct_unchanged_model_is_a_noop(setup):
    model, calib, _, _ = setup
    result = create_pass("reconstruct", {}, PassContext(calibration_data=calib, reference_model=model))(_copy(model))
    assert not result.modified


def test_reconstruct_after_save_and_reload(setup):
    # The in-memory record of kept channels is lost on a round trip; channels are paired by correlation.
    model, calib, x_test, y_test = setup
    student, ctx = _prune(model, calib, 0.5, "l1")
    reloaded = _copy(student)
    create_pass("reconstruct", {}, ctx)(student)
    result = create_pass("reconstruct", {}, ctx)(reloaded)
    assert any("correlation" in n for n in result.stats.notes)
    assert abs(digits.accuracy(reloaded, x_test, y_test) - digits.accuracy(student, x_test, y_test)) <= 0.01
