"""The ``fuse`` pass on transformer patterns: the zoo's BERT-style encoder from both torch exporters,
plus small modules for the hand-written LayerNorm, tanh-GELU and RMSNorm forms."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.errors import PassOptionError
from onnxforge.torch_export import export
from onnxforge.passes import PassContext, create_pass
from onnxforge.testing import numerics, zoo

import torch
nn = torch.nn


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _fuse(model: ir.Model, target: str = "cpu", explain: bool = False, **options):
    fused = _copy(model)
    result = create_pass("fuse", options, PassContext(target=target, explain=explain))(fused)
    return fused, result.stats


def _ids(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, zoo.MODELS["bert_encoder"].vocab_size, (batch, seq)).astype(np.int64)}


def _non_standard_ops(model: ir.Model) -> list[str]:
    return [
        f"{n.domain}::{n.op_type}"
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
        if n.domain not in ("", "ai.onnx")
    ]


@pytest.fixture(scope="session", params=[True, False], ids=["dynamo", "torchscript"])
def bert(request, zoo_model) -> ir.Model:
    return zoo_model("bert_encoder", dynamo=request.param)


@pytest.fixture(scope="session")
def bert_fused_cpu(bert):
    return _fuse(bert, target="cpu")


@pytest.fixture(scope="session")
def bert_fused_cuda(bert):
    return _fuse(bert, target="cuda")


def test_bert_fused_op_counts(bert_fused_cuda):
    # 2 layers: each one packed-QKV Attention, two SkipLayerNorm (attention and FFN residuals), one
    # BiasGelu; token + position embeddings and their LayerNorm become one EmbedLayerNormalization.
    # (Target cuda: the full set, as onnxruntime's transformer optimizer fuses it; cpu: see below.)
    fused, stats = bert_fused_cuda
    assert numerics.op_count(fused, "Attention", "com.microsoft") == 2
    assert numerics.op_count(fused, "SkipLayerNormalization", "com.microsoft") == 4
    assert numerics.op_count(fused, "BiasGelu", "com.microsoft") == 2
    assert numerics.op_count(fused, "EmbedLayerNormalization", "com.microsoft") == 1
    assert numerics.op_count(fused, "LayerNormalization") == 0
    assert stats.counts["EmbedLayerNormalization"] == 1
    for gone in ("Softmax", "Erf", "Transpose"):
        assert numerics.op_count(fused, gone) == 0, gone
    assert stats.counts["Attention"] == 2
    assert stats.counts["SkipLayerNormalization"] == 4
    assert stats.counts["Gelu"] == 2
    assert stats.counts["BiasGelu"] == 2
    assert stats.details["fused_ops"]["com.microsoft.Attention"] == 2
    # every projection bias ends inside a fused op: TorchScript writes Add(bias, MatMul), dynamo
    # Add(MatMul, bias); both must reach SkipLayerNormalization's bias input (input 4)
    assert numerics.op_count(fused, "Add") == 0
    skips = [n for n in fused.graph if n.op_type == "SkipLayerNormalization"]
    assert all(len(n.inputs) > 4 and n.inputs[4] is not None for n in skips)


def test_bert_cpu_keeps_layer_norm_with_residual_sum(bert, bert_fused_cpu, tmp_path):
    # On cpu, onnxruntime's SkipLayerNormalization kernel is slower than Add + LayerNormalization
    # (bench/bench_skiplayernorm.py): not emitted, and each residual Add before a LayerNorm becomes a
    # Sum so that onnxruntime's session optimizer does not fuse it either.
    fused, stats = bert_fused_cpu
    assert numerics.op_count(fused, "SkipLayerNormalization", "com.microsoft") == 0
    assert stats.counts["ResidualSum"] == 4
    assert numerics.op_count(fused, "LayerNormalization") == 4
    assert all(n.inputs[0].producer().op_type == "Sum" for n in fused.graph if n.op_type == "LayerNormalization")
    # the projection bias joins the residual sum: Sum(x, bias, skip), no Add left
    assert all(len(n.inputs) == 3 for n in fused.graph if n.op_type == "Sum")
    assert numerics.op_count(fused, "Add") == 0
    assert numerics.op_count(fused, "Attention", "com.microsoft") == 2
    assert numerics.op_count(fused, "EmbedLayerNormalization", "com.microsoft") == 1
    assert numerics.op_count(fused, "BiasGelu", "com.microsoft") == 2
    assert any("SkipLayerNormalization: off by default for target 'cpu'" in n for n in stats.notes)
    numerics.assert_outputs_close(bert, fused, _ids(2, 16), rtol=1e-4)
    # ... and onnxruntime at ORT_ENABLE_ALL leaves them alone
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(ir.to_proto(fused).SerializeToString(), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(so.optimized_model_filepath)
    assert not [n for n in optimized.graph.node if n.op_type == "SkipLayerNormalization"]


def test_skip_layer_norm_on_cpu_when_asked(bert):
    fused, stats = _fuse(bert, target="cpu", rules=["SkipLayerNormalization"])
    assert stats.counts["SkipLayerNormalization"] == 4


def test_packed_qkv_weights_are_initializers(bert_fused_cpu):
    # the attention rule concatenates W_q, W_k, W_v (and their biases); fuse folds that Concat so no
    # run recomputes it: Attention's weight and bias are plain initializers
    fused, _ = bert_fused_cpu
    attention = [n for n in fused.graph if n.op_type == "Attention"]
    assert attention
    for node in attention:
        for value in node.inputs[1:3]:
            assert value.is_initializer(), f"{node.name}: {value.name} is computed, not stored"
            assert value.const_value is not None
    assert numerics.op_count(fused, "Concat") == 0


@pytest.mark.parametrize("batch,seq", [(2, 16), (3, 37)])
def test_bert_outputs_match(bert, bert_fused_cpu, batch, seq):
    fused, _ = bert_fused_cpu
    numerics.assert_outputs_close(bert, fused, _ids(batch, seq), rtol=1e-4)


def test_bert_target_onnx_has_no_contrib_ops(bert):
    fused, stats = _fuse(bert, target="onnx")
    assert _non_standard_ops(fused) == []
    assert any("Gelu" in n for n in stats.notes)  # opset 18 < 20: GELU left as is, and said so
    numerics.assert_outputs_close(bert, fused, _ids(2, 11))


def test_bert_tensorrt_keeps_mha_not_packed_attention(bert):
    fused, stats = _fuse(bert, target="tensorrt")
    assert numerics.op_count(fused, "Attention", "com.microsoft") == 0
    assert numerics.op_count(fused, "MultiHeadAttention", "com.microsoft") == 2
    assert any(n.startswith("Attention: not applied") for n in stats.notes)


def test_bert_target_onnx_keeps_embedding_layer_norm(bert):
    fused, stats = _fuse(bert, target="onnx")
    assert numerics.op_count(fused, "LayerNormalization") == 5
    assert any(n.startswith("EmbedLayerNormalization: not applied") for n in stats.notes)


def test_exclude_rule(bert):
    fused, stats = _fuse(bert, exclude_rules=["Attention", "MultiHeadAttention"])
    assert numerics.op_count(fused, "Attention", "com.microsoft") == 0
    assert numerics.op_count(fused, "Softmax") == 2
    assert "Attention" not in stats.counts
    numerics.assert_outputs_close(bert, fused, _ids(2, 9))


def test_only_embed_layer_norm(bert):
    fused, stats = _fuse(bert, rules=["EmbedLayerNormalization"])
    assert dict(stats.counts) == {"EmbedLayerNormalization": 1}
    node = next(n for n in fused.graph if n.op_type == "EmbedLayerNormalization")
    # positions come from a Gather of arange(seq): passed as position_ids (input 8), ids cast to int32
    assert len(node.inputs) == 9 and node.inputs[8] is not None
    cast = node.inputs[0].producer()
    assert cast.op_type == "Cast" and cast.attributes.get_int("to") == ir.DataType.INT32
    assert node.attributes.get_float("epsilon") == pytest.approx(1e-5)
    numerics.assert_outputs_close(bert, fused, _ids(2, 7), rtol=1e-4)


def test_only_selected_rules(bert):
    fused, stats = _fuse(bert, rules=["SkipLayerNormalization"])
    assert set(stats.counts) == {"SkipLayerNormalization"}
    assert numerics.op_count(fused, "Softmax") == 2


def test_explain_lists_near_misses(bert):
    _, stats = _fuse(bert, target="cuda", explain=True, exclude_rules=["EmbedLayerNormalization"])
    misses = stats.details["near_misses"]
    assert misses and all(m["reason"] and m["nodes"] for m in misses)
    # the embedding LayerNorm has no residual Add: SkipLayerNorm near-miss with onnxscript's reason
    assert any(m["rule"] == "SkipLayerNormalization" for m in misses)
    assert len(stats.skipped) == sum(len(m["nodes"]) for m in misses)


def test_unknown_rule_and_family_are_errors():
    with pytest.raises(PassOptionError, match="SkipLayerNormalization"):
        create_pass("fuse", {"rules": ["SkipLayerNorm"]})
    with pytest.raises(PassOptionError, match="family"):
        create_pass("fuse", {"families": ["rnn"]})


def test_options_from_strings():
    p = create_pass("fuse", {"families": "transformer", "exclude_rules": ["Attention"]})
    assert p.families == ["transformer"]
    names = [r.name for r in p.selected_rules()]
    assert "Attention" not in names and "FusedConv" not in names


# --- hand-written forms ------------------------------------------------------------------------------


class ManualLayerNorm(nn.Module):
    """LayerNorm as older BERT code writes it: mean, (x-u)^2 mean, /sqrt(var+eps), then affine."""

    def __init__(self, d=32):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.b = nn.Parameter(torch.randn(d) * 0.1)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        y = self.lin(x)
        u = y.mean(-1, keepdim=True)
        s = (y - u).pow(2).mean(-1, keepdim=True)
        return self.w * ((y - u) / torch.sqrt(s + 1e-5)) + self.b


class TanhGelu(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        y = self.lin(x)
        return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3))))


class ManualRMSNorm(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        y = self.lin(x)
        return self.w * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6))


def _export_small(module, dynamo=True, opset=18):
    torch.manual_seed(0)
    return export(module.eval(), (torch.randn(2, 5, 32),), opset=opset, dynamo=dynamo)


@pytest.fixture(scope="session", params=[True, False], ids=["dynamo", "torchscript"])
def manual_ln(request) -> ir.Model:
    torch.manual_seed(0)
    return _export_small(ManualLayerNorm(), dynamo=request.param)


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_manual_layer_norm(manual_ln, target):
    model = manual_ln
    assert numerics.op_count(model, "ReduceMean") == 2
    fused, stats = _fuse(model, target=target)
    assert numerics.op_count(fused, "LayerNormalization") == 1
    assert numerics.op_count(fused, "ReduceMean") == 0
    assert stats.counts["LayerNormalization"] == 1
    if target == "onnx":
        assert _non_standard_ops(fused) == []
    feeds = {model.graph.inputs[0].name: np.random.default_rng(1).standard_normal((3, 5, 32)).astype(np.float32)}
    numerics.assert_outputs_close(model, fused, feeds)


def test_tanh_gelu_to_fast_gelu():
    torch.manual_seed(0)
    model = _export_small(TanhGelu(), dynamo=False)
    fused, stats = _fuse(model)
    # FastGelu with the Linear's bias folded in (onnxruntime's FastGelu takes an optional bias)
    assert numerics.op_count(fused, "FastGelu", "com.microsoft") == 1
    assert numerics.op_count(fused, "Tanh") == 0
    assert stats.counts["FastGelu"] == 1
    feeds = {model.graph.inputs[0].name: np.random.default_rng(2).standard_normal((3, 5, 32)).astype(np.float32)}
    numerics.assert_outputs_close(model, fused, feeds)


def test_tanh_gelu_standard_at_opset_20():
    torch.manual_seed(0)
    model = _export_small(TanhGelu(), opset=20)
    fused, _ = _fuse(model, target="onnx")
    assert _non_standard_ops(fused) == []
    assert numerics.op_count(fused, "Tanh") == 0
    assert numerics.op_count(fused, "Gelu") == 1
    feeds = {model.graph.inputs[0].name: np.random.default_rng(2).standard_normal((3, 5, 32)).astype(np.float32)}
    numerics.assert_outputs_close(model, fused, feeds)


def test_rms_norm():
    torch.manual_seed(0)
    model = _export_small(ManualRMSNorm())
    fused, stats = _fuse(model)
    assert numerics.op_count(fused, "SimplifiedLayerNormalization") == 1
    assert stats.counts["RMSNormalization"] == 1
    feeds = {model.graph.inputs[0].name: np.random.default_rng(3).standard_normal((3, 5, 32)).astype(np.float32)}
    numerics.assert_outputs_close(model, fused, feeds)


class ResidualRMSNorm(nn.Module):
    """Pre-norm residual block: RMSNorm(x + Linear(x)) then a projection (torch.rsqrt, which
    TorchScript writes as 1 / Sqrt)."""

    def __init__(self, d=32):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = x + self.lin(x)
        return self.out(self.w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_residual_rms_norm_per_target(dynamo):
    model = _export_small(ResidualRMSNorm(), dynamo=dynamo)
    feeds = {model.graph.inputs[0].name: np.random.default_rng(4).standard_normal((3, 5, 32)).astype(np.float32)}
    cpu, stats = _fuse(model, target="cpu")
    assert stats.counts["RMSNormalization"] == 1 and stats.counts["ResidualSum"] == 1
    (norm,) = [n for n in cpu.graph if n.op_type == "SimplifiedLayerNormalization"]
    total = norm.inputs[0].producer()
    assert total.op_type == "Sum" and len(total.inputs) == 3  # x, the projection's bias, the residual
    assert numerics.op_count(cpu, "SkipSimplifiedLayerNormalization", "com.microsoft") == 0
    numerics.assert_outputs_close(model, cpu, feeds)
    cuda, stats = _fuse(model, target="cuda")
    assert numerics.op_count(cuda, "SkipSimplifiedLayerNormalization", "com.microsoft") == 1
    # the projection bias goes in as its input 3, whichever order the exporter wrote Add(bias, MatMul)
    (skip,) = [n for n in cuda.graph if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(skip.inputs) > 3 and skip.inputs[3] is not None
    assert numerics.op_count(cuda, "Add") == 1  # only the output projection's bias
    numerics.assert_outputs_close(model, cuda, feeds)


# --- EmbedLayerNormalization variants ------------------------------------------------------------------


class Embeddings(nn.Module):
    """Token + position (+ segment) embeddings and LayerNorm, positions either given as an input (any
    ids, e.g. RoBERTa-style offsets or left padding) or a learned ``[1, S, H]`` table added whole."""

    def __init__(self, positions: str, segment: bool, vocab=50, hidden=32, max_pos=40, seq=12):
        super().__init__()
        self.positions, self.segment = positions, segment
        self.tokens = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden) if positions == "ids" else None
        self.table = nn.Parameter(torch.randn(1, seq, hidden)) if positions == "table" else None
        self.seg = nn.Embedding(2, hidden) if segment else None
        self.ln = nn.LayerNorm(hidden, eps=1e-6)
        with torch.no_grad():
            self.ln.weight.copy_(torch.rand(hidden) + 0.5)
            self.ln.bias.copy_(torch.randn(hidden) * 0.1)

    def forward(self, input_ids, position_ids, segment_ids):
        x = self.tokens(input_ids)
        if self.segment:
            x = x + self.seg(segment_ids)
        x = x + (self.pos(position_ids) if self.positions == "ids" else self.table)
        return self.ln(x)


def _embed_feeds(batch, seq, seed):
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, 50, (batch, seq)).astype(np.int64),
        "position_ids": rng.integers(0, 40, (batch, seq)).astype(np.int64),  # not 0..seq-1
        "segment_ids": rng.integers(0, 2, (batch, seq)).astype(np.int64),
    }


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("positions,segment", [("ids", True), ("ids", False), ("table", True)])
def test_embed_layer_norm_variants(positions, segment, dynamo):
    torch.manual_seed(0)
    module = Embeddings(positions, segment)
    seq_axis = {1: "seq"} if positions == "ids" else {}  # a whole [1, S, H] table fixes S
    feeds = {k: torch.from_numpy(v) for k, v in _embed_feeds(2, 12, 0).items()}
    model = export(
        module, tuple(feeds.values()), dynamo=dynamo, opset=18,
        input_names=list(feeds), dynamic_axes={k: seq_axis for k in feeds},
    )  # fmt: skip
    fused, stats = _fuse(model, rules=["EmbedLayerNormalization"])
    assert stats.counts["EmbedLayerNormalization"] == 1, stats.details.get("near_misses")
    node = next(n for n in fused.graph if n.op_type == "EmbedLayerNormalization")
    assert (node.inputs[1] is not None) == segment  # segment_ids
    assert (len(node.inputs) == 9) == (positions == "ids")  # position_ids only when gathered
    assert numerics.op_count(fused, "LayerNormalization") == 0
    names = {v.name for v in model.graph.inputs}  # TorchScript drops unused inputs
    for batch, seq in ([(3, 12), (1, 12)] if positions == "table" else [(3, 12), (2, 29)]):
        feeds = {k: v for k, v in _embed_feeds(batch, seq, seq).items() if k in names}
        numerics.assert_outputs_close(model, fused, feeds, rtol=1e-4)


def test_embed_layer_norm_refuses_shared_sum():
    class SharedSum(Embeddings):
        def forward(self, input_ids, position_ids, segment_ids):
            x = self.tokens(input_ids) + self.pos(position_ids)
            return self.ln(x), x.sum(-1)

    torch.manual_seed(0)
    feeds = {k: torch.from_numpy(v) for k, v in _embed_feeds(2, 12, 0).items()}
    model = export(SharedSum("ids", False), tuple(feeds.values()), input_names=list(feeds), dynamo=False)
    fused, stats = _fuse(model, rules=["EmbedLayerNormalization"])
    assert "EmbedLayerNormalization" not in stats.counts
    assert numerics.op_count(fused, "LayerNormalization") == 1
