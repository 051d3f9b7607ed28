"""Each output's batch axis (``onnxforge.runtime.batch``), and tune's evaluator using it.

A time-major recognizer head (``(N, C, T)`` features -> ``(T, N, K)`` logits, as a CTC text
recognizer's LSTM emits them) exported by torch with a fixed batch of 1: slicing axis 0 of its
outputs per sample kept the first time step only, so tune's metric on the ddddocr recognizer saw
one character of each string (a 4-point loss read as 0).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.runtime.batch import batch_axes

T, C, K = 6, 5, 4


def _export(module, example):
    from onnxforge.testing import zoo

    return ir.serde.serialize_model(zoo.export_model(module.eval(), (example,))).SerializeToString()


@pytest.fixture(scope="module")
def time_major():
    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(C, K)

        def forward(self, x):  # (N, C, T) -> (T, N, K)
            return self.fc(x.permute(2, 0, 1))

    torch.manual_seed(0)
    return _export(Head(), torch.zeros(1, C, T))


def test_batch_axis_is_measured(time_major):
    import onnx
    import torch

    x = np.random.default_rng(0).standard_normal((1, C, T)).astype(np.float32)
    name = onnx.load_from_string(time_major).graph.input[0].name
    assert set(batch_axes(time_major, {name: x}).values()) == {1}
    flat = _export(torch.nn.Flatten(), torch.zeros(1, C, T))  # (N, C*T): samples on axis 0
    name = onnx.load_from_string(flat).graph.input[0].name
    assert set(batch_axes(flat, {name: x}).values()) == {0}

    class Fold(torch.nn.Module):  # a second sample doubles axis 1 (3,549 anchors -> 7,098 in the YOLOX)
        def forward(self, x):
            return x.reshape(1, -1)

    # a fixed-batch reshape that folds the samples into another axis is not a batch axis
    folded = _export(Fold(), torch.zeros(1, C, T))
    name = onnx.load_from_string(folded).graph.input[0].name
    assert set(batch_axes(folded, {name: x}).values()) == {0}


def test_tune_metric_gets_samples_on_axis_0(time_major, tmp_path):
    """The evaluator runs the fixed-batch model one sample at a time and hands the metric every
    sample's whole sequence: ``(N, T, K)``, equal to the model's per-sample outputs."""
    import onnx
    import onnxruntime as ort

    from onnxforge.tune.evaluate import EvalSettings, EvalSpec, Evaluator

    name = onnx.load_from_string(time_major).graph.input[0].name
    data = {name: np.random.default_rng(1).standard_normal((5, C, T)).astype(np.float32)}
    ev = Evaluator(EvalSpec(time_major, data, EvalSettings(metric="cosine", latency="size")))
    out = next(iter(ev.original_outputs().values()))
    assert out.shape == (5, T, K)
    sess = ort.InferenceSession(time_major, providers=["CPUExecutionProvider"])
    for i in range(5):
        (ref,) = sess.run(None, {name: data[name][i:i + 1]})  # (T, 1, K)
        np.testing.assert_allclose(out[i], ref[:, 0], rtol=1e-5, atol=1e-6)
