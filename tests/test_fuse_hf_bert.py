"""The ``fuse`` pass on a Hugging Face ``transformers`` BertModel (random weights from a small
``BertConfig``, nothing downloaded) with an ``attention_mask`` input, from both torch exporters.

Skipped when ``transformers`` is not installed. Exports are cached on disk next to the zoo cache
(keyed on the torch / transformers / onnxscript versions and this file's config)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.testing import numerics

import torch
import transformers

CACHE = Path(__file__).resolve().parent.parent / ".onnxforge-cache" / "hf"
CONFIG = dict(
    vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
    max_position_embeddings=128,
)  # fmt: skip


def _export(dynamo: bool) -> ir.Model:
    import onnxscript

    from onnxforge.torch_export import export, save_atomic

    key = hashlib.sha256(
        repr((CONFIG, dynamo, torch.__version__, transformers.__version__, onnxscript.__version__)).encode()
    ).hexdigest()[:16]
    path = CACHE / f"bert-{'dynamo' if dynamo else 'torchscript'}-{key}.onnx"
    if path.exists():
        return ir.load(path)

    class Bert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(transformers.BertConfig(**CONFIG), add_pooling_layer=False)

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 1000, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    seq = {1: "seq"}
    model = export(
        Bert().eval(), (ids, mask), dynamo=dynamo, opset=18, input_names=["input_ids", "attention_mask"],
        dynamic_axes={"input_ids": seq, "attention_mask": seq},
    )  # fmt: skip
    CACHE.mkdir(parents=True, exist_ok=True)
    save_atomic(model, path)  # atomic: parallel test workers share the folder
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["dynamo", "torchscript"])
def hf_bert(request):
    model = _export(request.param)
    fused = ir.from_proto(ir.to_proto(model))
    stats = create_pass("fuse", {}, PassContext(target="cpu"))(fused).stats
    return request.param, model, fused, stats


def _feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2 :] = 0  # right padding in the first sequence: masked keys
    return {"input_ids": rng.integers(0, 1000, (batch, seq)).astype(np.int64), "attention_mask": mask}


def test_hf_bert_fused_counts(hf_bert):
    _, model, fused, stats = hf_bert
    # word + token-type (a zero buffer) + position embeddings, then LayerNorm → one op
    assert numerics.op_count(fused, "EmbedLayerNormalization", "com.microsoft") == 1
    assert numerics.op_count(fused, "BiasGelu", "com.microsoft") == 2
    assert stats.counts["EmbedLayerNormalization"] == 1
    # cpu: residual Add + LayerNorm kept (as Sum), SkipLayerNormalization is the slower kernel there
    assert stats.counts["ResidualSum"] == 4
    assert numerics.op_count(fused, "SkipLayerNormalization", "com.microsoft") == 0
    # cuda: SkipLayerNormalization, with the output projections' biases (Add(bias, MatMul) from
    # TorchScript) inside it
    cuda = ir.from_proto(ir.to_proto(model))
    create_pass("fuse", {}, PassContext(target="cuda"))(cuda)
    assert numerics.op_count(cuda, "SkipLayerNormalization", "com.microsoft") == 4
    assert numerics.op_count(cuda, "LayerNormalization") == 0
    skips = [n for n in cuda.graph if n.op_type == "SkipLayerNormalization"]
    assert all(len(n.inputs) > 4 and n.inputs[4] is not None for n in skips)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_hf_bert_attention_with_mask(hf_bert, dynamo):
    if hf_bert[0] != dynamo:
        pytest.skip("other exporter")
    _, _, fused, _ = hf_bert
    attention = [n for n in fused.graph if n.op_type == "Attention" and n.domain == "com.microsoft"]
    assert len(attention) == 2
    # the padding mask reaches Attention as its additive attention_bias ([B, 1, S, S], input 5),
    # computed once from attention_mask and shared by both layers
    biases = {n.inputs[5] for n in attention if len(n.inputs) > 5}
    assert len(biases) == 1 and None not in biases
    assert numerics.op_count(fused, "Softmax") == 0


@pytest.mark.parametrize("batch,seq", [(2, 16), (3, 37)])
def test_hf_bert_outputs_match(hf_bert, batch, seq):
    _, model, fused, _ = hf_bert
    numerics.assert_outputs_close(model, fused, _feeds(batch, seq, seq), rtol=1e-4)


def test_hf_bert_fully_masked_sequence(hf_bert):
    # A sequence that is all padding masks every key of its rows. TorchScript's graph guards the
    # softmax (NaN → 0, so those rows attend to nothing); onnxruntime's fused attention returns NaN
    # there, so the fusion keeps the guard after the fused op. Both exporters must stay finite.
    _, model, fused, _ = hf_bert
    feeds = _feeds(2, 16, 16)
    feeds["attention_mask"][0] = 0
    (expected,) = numerics.run(model, feeds)
    (actual,) = numerics.run(fused, feeds)
    assert np.isfinite(expected).all()
    assert np.isfinite(actual).all(), "fused attention returned NaN for a fully masked sequence"
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_hf_bert_target_onnx_standard_ops_only(hf_bert):
    _, model, _, _ = hf_bert
    fused = ir.from_proto(ir.to_proto(model))
    create_pass("fuse", {}, PassContext(target="onnx"))(fused)
    assert not [n for n in fused.graph if n.domain not in ("", "ai.onnx")]
    numerics.assert_outputs_close(model, fused, _feeds(3, 37, 37), rtol=1e-4)
