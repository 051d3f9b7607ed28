"""Shared, session-scoped fixtures: zoo exports, the digits data, the bundled demo model.

torch is imported only by the fixtures that need it, so test files that don't use them collect fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ZOO_CACHE = REPO / ".onnxforge-cache" / "zoo"


@pytest.fixture(scope="session")
def zoo_model():
    """Factory ``zoo_model(name, opset=18, dynamo=True) -> onnx_ir.Model``.

    Exports are cached on disk (``.onnxforge-cache/zoo``, keyed on the zoo/export sources and
    versions) and in memory for the session; every call returns a fresh model, so a test may modify
    it in place.
    """
    import onnx_ir as ir

    from onnxforge.testing import zoo

    memo: dict[tuple[str, int, bool], bytes] = {}

    def factory(name: str, opset: int = 18, dynamo: bool = True) -> ir.Model:
        key = (name, opset, dynamo)
        if key not in memo:
            model = zoo.export_cached(name, opset=opset, dynamo=dynamo, cache_dir=ZOO_CACHE)
            memo[key] = ir.to_proto(model).SerializeToString()
        return ir.from_proto(_parse(memo[key]))

    return factory


def _parse(data: bytes):
    import onnx

    return onnx.load_from_string(data)


@pytest.fixture(scope="session")
def digits():
    """``(x_train, y_train, x_test, y_test)`` of the digits demo data (float32 NCHW 1x8x8, int64)."""
    from onnxforge.testing.digits import load_digits_split

    return load_digits_split()


@pytest.fixture(scope="session")
def trained_digits():
    """The trained digits CNN exported by torch (BatchNorm left in), 8 calibration batches of 32 training
    images, and the test split: ``model`` (do not modify: copy it), ``calib``, ``x``, ``y``, ``name`` (input),
    ``acc`` (fp32 test accuracy)."""
    import torch

    from onnxforge.testing import digits as dg
    from onnxforge.testing import zoo

    x_train, _, x_test, y_test = dg.load_digits_split()
    module = dg.train_digits_cnn(seed=0)
    model = zoo.export_model(module, (torch.from_numpy(x_test[:1]),))
    name = model.graph.inputs[0].name
    calib = [{name: x_train[i : i + 32]} for i in range(0, 256, 32)]
    return {"model": model, "calib": calib, "x": x_test, "y": y_test, "name": name,
            "acc": dg.accuracy(model, x_test, y_test)}


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """Path of the bundled demo model, ``examples/digits_cnn.onnx`` (input ``input``, 10 logits)."""
    path = REPO / "examples" / "digits_cnn.onnx"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python examples/make_demo_model.py`")
    return path


@pytest.fixture(scope="session")
def demo_data_path() -> Path:
    """Path of ``examples/digits_data.npz`` (keys ``input``, ``x_test``, ``y_test``)."""
    path = REPO / "examples" / "digits_data.npz"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `python examples/make_demo_model.py`")
    return path
