"""LSTM in int8: ``quantize-int8`` and ``quantize-dynamic`` rewrite it as onnxruntime's DynamicQuantizeLSTM.

A CRNN-style text recognizer in miniature (conv -> bidirectional LSTM -> linear head, exported by
torch) is the model. Outputs compared by name against the fp32 model on onnxruntime. Stated bound
(random weights, 4 feeds): cosine >= 0.999 and max abs error <= 5 % of the output's max magnitude
(measured: cosine >= 0.9999, max error <= 2.0 % with the conv and head int8 too).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.passes.quantize.qmath import cosine
from onnxforge.passes.quantize.recurrent import not_quantizable, quantize_rows
from onnxforge.testing.numerics import run

T, HIDDEN, FEATURES = 24, 32, 64


@pytest.fixture(scope="module")
def crnn():
    import torch

    from onnxforge.testing import zoo

    class CRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.lstm = torch.nn.LSTM(FEATURES, HIDDEN, bidirectional=True)
            self.fc = torch.nn.Linear(2 * HIDDEN, 10)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            n, c, h, w = y.shape
            y, _ = self.lstm(y.reshape(n, c * h, w).permute(2, 0, 1))  # [T, N, 64]
            return self.fc(y)

    torch.manual_seed(0)
    model = zoo.export_model(CRNN().eval(), (torch.zeros(1, 1, 4, T),))
    inp = model.graph.inputs[0].name
    rng = np.random.default_rng(0)
    feeds = [{inp: rng.standard_normal((1, 1, 4, T)).astype(np.float32)} for _ in range(4)]
    return model, feeds


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _check_outputs(model: ir.Model, quantized: ir.Model, feeds) -> None:
    names = [o.name for o in model.graph.outputs]
    sess = ort.InferenceSession(ir.serde.serialize_model(quantized).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == names
    for feed in feeds:
        ref = dict(zip(names, run(model, feed)))
        got = dict(zip(names, sess.run(None, feed)))
        for k in names:
            assert cosine(ref[k], got[k]) >= 0.999, k
            assert np.max(np.abs(ref[k] - got[k])) <= 0.05 * np.max(np.abs(ref[k])), k


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def test_quantize_int8_runs_the_lstm_in_int8(crnn):
    model, feeds = crnn
    q = create_pass("quantize-int8", {}, PassContext(calibration_data=feeds))(_copy(model))
    ops = _ops(q.model)
    assert ops["DynamicQuantizeLSTM"] == 1 and "LSTM" not in ops, ops
    assert q.stats.counts["LSTM_dynamic_int8"] == 1 and q.stats.counts["quantized_Conv"] == 1
    # no Q/DQ at the LSTM's edges: it reads and writes float, its kernel quantizes inside
    lstm = next(n for n in q.model.graph if n.op_type == "DynamicQuantizeLSTM")
    assert lstm.domain == "com.microsoft"
    assert all(u.node.op_type != "QuantizeLinear" for o in lstm.outputs for u in o.uses())
    # the float W and R are gone: only their int8 copies (the model got smaller)
    assert not any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
                   and v.const_value.size == 2 * 4 * HIDDEN * FEATURES for v in q.model.graph.initializers.values())
    _check_outputs(model, q.model, feeds)


def test_lstm_can_be_excluded_and_kept_float_by_the_budget(crnn):
    model, feeds = crnn
    q = create_pass("quantize-int8", {"exclude": ["LSTM"]}, PassContext(calibration_data=feeds))(_copy(model))
    assert _ops(q.model)["LSTM"] == 1 and "DynamicQuantizeLSTM" not in _ops(q.model)
    # a zero budget keeps every candidate float, the LSTM among them: it is one of the fallback's nodes
    q = create_pass("quantize-int8", {"max_drop": 0.0}, PassContext(calibration_data=feeds))(_copy(model))
    assert _ops(q.model)["LSTM"] == 1 and "DynamicQuantizeLSTM" not in _ops(q.model)
    assert any(s.op_type == "LSTM" and "max_drop" in s.reason for s in q.stats.skipped)


def test_quantize_dynamic_runs_the_lstm_in_int8(crnn):
    model, feeds = crnn
    q = create_pass("quantize-dynamic", {}, PassContext())(_copy(model))
    assert _ops(q.model)["DynamicQuantizeLSTM"] == 1 and q.stats.counts["dynamic_LSTM"] == 1
    _check_outputs(model, q.model, feeds)
    # target onnx: a contrib op is not portable, the LSTM stays float and says why
    q = create_pass("quantize-dynamic", {}, PassContext(target="onnx"))(_copy(model))
    assert _ops(q.model)["LSTM"] == 1
    assert any(s.op_type == "LSTM" and "contrib" in s.reason for s in q.stats.skipped)


def test_row_quantization_math():
    w = np.array([[[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]]], np.float32)  # [dirs=1, rows=2, K=3]
    q, scale = quantize_rows(w)
    assert q.shape == (1, 3, 2) and q.dtype == np.int8  # stored [dirs, K, rows]
    np.testing.assert_allclose(scale, [[1.0 / 127, 1.0]])  # a zero row gets scale 1 (any scale works)
    np.testing.assert_array_equal(q[0, :, 0], [64, -127, 32])  # round_half_even(0.5 * 127) = 64
    np.testing.assert_array_equal(q[0, :, 1], [0, 0, 0])


def test_batch_first_lstm_stays_float():
    w = ir.Value(name="W", const_value=ir.tensor(np.zeros((1, 8, 3), np.float32)))
    r = ir.Value(name="R", const_value=ir.tensor(np.zeros((1, 8, 2), np.float32)))
    x = ir.Value(name="X")
    node = ir.node("LSTM", [x, w, r], attributes={"hidden_size": 2, "layout": 1})
    assert "layout=1" in not_quantizable(node)
    assert not_quantizable(ir.node("LSTM", [x, w, r], attributes={"hidden_size": 2})) is None


def test_lstm_macs_are_counted(crnn):
    from onnxforge.ir.summary import node_work, summarize

    model, _ = crnn
    macs, _ = node_work(model)
    lstm = [m for n, m in zip(model.graph, macs) if n.op_type == "LSTM"]
    assert lstm == [T * 1 * 2 * 4 * HIDDEN * (FEATURES + HIDDEN)]  # steps x batch x directions x 4H x (I + H)
    assert summarize(model).flops_by_op["LSTM"] == 2 * lstm[0]
