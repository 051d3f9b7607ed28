"""The model zoo of the tests and benchmarks: small plain-torch modules and their ONNX exports.

Every builder is deterministic (``torch.manual_seed``) and gives BatchNorm layers non-trivial statistics
and affine parameters (random running mean/var, weight, bias), so that a folding pass that gets the
math wrong changes the outputs. The modules are returned in eval mode.

    >>> model = export_model("conv_bn")            # onnx_ir.Model, dynamic batch, opset 18 (dynamo)
    >>> model = export_model("bert_encoder", dynamo=False)   # dynamic batch and sequence
    >>> model = export_opset11("resnet_style")     # TorchScript exporter, opset 11
    >>> model = constants_as_nodes(model)           # weights as Constant nodes (PaddlePaddle style)

torch is imported lazily: importing this module does not need it, building or exporting does.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.errors import ModelSaveError
from onnxforge.torch_export import export, import_torch

__all__ = [
    "MODELS",
    "OPSET11_MODELS",
    "ModelSpec",
    "build",
    "constants_as_nodes",
    "example_inputs",
    "export_cached",
    "export_model",
    "export_opset11",
    "feeds",
    "names",
]


@dataclass(frozen=True)
class ModelSpec:
    """How to build, feed and export one zoo model."""

    name: str
    builder: Callable[[], Any]  # () -> torch.nn.Module (eval mode, deterministic)
    input_shape: tuple[int, ...]  # one sample, without the batch axis (bert: (seq,))
    kind: str  # "cnn", "transformer", "mlp"
    description: str = ""
    input_names: tuple[str, ...] = ("input",)
    input_dtype: str = "float32"  # "int64" for token ids
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)  # beyond the batch axis
    postprocess: Callable[[ir.Model, Any], None] | None = None  # (exported model, module) -> None
    opset11: bool = True  # exports at opset 11 with the TorchScript exporter
    vocab_size: int = 0  # token-id range for int64 inputs

    @property
    def is_cnn(self) -> bool:
        return self.kind == "cnn"

    @property
    def is_transformer(self) -> bool:
        return self.kind == "transformer"

    def example_inputs(self, batch: int = 1, seq: int | None = None, seed: int = 0) -> tuple[Any, ...]:
        """Deterministic example tensors: float inputs ~ N(0, 1); token ids uniform in the vocabulary."""
        torch = import_torch()
        gen = torch.Generator().manual_seed(seed)
        shape = self.input_shape
        if seq is not None:
            if not self.is_transformer:
                raise ValueError(f"zoo: seq= applies to transformer models, not {self.name!r}")
            shape = (seq, *shape[1:])
        if self.input_dtype == "int64":
            return (torch.randint(0, self.vocab_size, (batch, *shape), generator=gen, dtype=torch.int64),)
        return (torch.randn((batch, *shape), generator=gen),)


# --- building blocks ---------------------------------------------------------------------------------


def _nn():
    return import_torch().nn


def _randomize_bn(module) -> None:
    """Give every BatchNorm random running statistics and affine parameters (in place, seeded by caller)."""
    torch = import_torch()
    nn = torch.nn
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n) * 0.2)
                m.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n) * 1.0 + 0.5)
                m.bias.copy_(torch.randn(n) * 0.2)


def _finish(module, seed: int = 0):
    """Seeded BN randomization, eval mode: every builder ends here."""
    torch = import_torch()
    torch.manual_seed(seed + 1)
    _randomize_bn(module)
    return module.eval()


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str | None = "relu"):
    nn = _nn()
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(
            {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU}[act]()
        )
    return nn.Sequential(*layers)


# --- the small pattern models ------------------------------------------------------------------------


def build_conv_bn():
    torch, nn = import_torch(), _nn()
    torch.manual_seed(0)
    return _finish(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)))


def build_conv_bn_relu_residual():
    torch, nn = import_torch(), _nn()

    class ConvBnReluResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = _conv_bn(3, 16)
            self.conv1 = _conv_bn(16, 16)
            self.conv2 = _conv_bn(16, 16, act=None)

        def forward(self, x):
            x = self.stem(x)
            return torch.relu(self.conv2(self.conv1(x)) + x)

    torch.manual_seed(0)
    return _finish(ConvBnReluResidual())


def build_convtranspose_bn():
    torch, nn = import_torch(), _nn()
    torch.manual_seed(0)
    return _finish(
        nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
        )
    )


def build_linear_bn1d():
    torch, nn = import_torch(), _nn()
    torch.manual_seed(0)
    return _finish(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)))


def build_linear_affine():
    torch, nn = import_torch(), _nn()

    class LinearAffine(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.register_buffer("scale", torch.rand(32) + 0.5)
            self.register_buffer("shift", torch.randn(32) * 0.3)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x) * self.scale + self.shift))

    torch.manual_seed(0)
    return _finish(LinearAffine())


def build_shared_weights():
    torch, nn = import_torch(), _nn()

    class SharedWeights(nn.Module):
        """One Conv (weight and bias) applied twice, each use followed by its own BatchNorm; one Linear
        applied twice. Folding a BN into the shared Conv must refuse (or clone the weight)."""

        def __init__(self):
            super().__init__()
            self.stem = _conv_bn(3, 8)
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(self.bn1(self.shared(x)))
            x = torch.relu(self.bn2(self.shared(x)))
            x = x.mean((2, 3))
            x = self.fc(torch.relu(self.fc(x)))
            return self.head(x)

    torch.manual_seed(0)
    return _finish(SharedWeights())


def build_dead_branch():
    torch, nn = import_torch(), _nn()

    class DeadBranch(nn.Module):
        """``dead`` is computed and thrown away. Both torch exporters drop it, so :func:`export_model`
        puts it back into the ONNX graph (see ``_add_dead_branch``): a Conv with its own weight and a
        Sigmoid that reach no output."""

        def __init__(self):
            super().__init__()
            self.body = _conv_bn(3, 8)
            self.dead = nn.Conv2d(8, 4, 1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.body(x)
            dead = torch.sigmoid(self.dead(y))  # noqa: F841 - reaches no output, on purpose
            return self.head(y)

    torch.manual_seed(0)
    return _finish(DeadBranch())


def _add_dead_branch(model: ir.Model, module) -> None:
    """Insert ``Sigmoid(Conv(relu_out, dead.weight, dead.bias))`` whose result no output uses."""
    relu = next(n for n in model.graph if n.op_type == "Relu")
    w = ir.Value(name="dead.weight", const_value=ir.tensor(module.dead.weight.detach().numpy(), name="dead.weight"))
    b = ir.Value(name="dead.bias", const_value=ir.tensor(module.dead.bias.detach().numpy(), name="dead.bias"))
    for v in (w, b):
        v.shape = ir.Shape(v.const_value.shape)
        v.dtype = ir.DataType.FLOAT
        model.graph.register_initializer(v)
    conv = ir.node("Conv", [relu.outputs[0], w, b], attributes={"kernel_shape": [1, 1]}, name="dead_conv")
    conv.outputs[0].name = "dead_conv_out"
    sig = ir.node("Sigmoid", [conv.outputs[0]], name="dead_sigmoid")
    sig.outputs[0].name = "dead_out"
    model.graph.insert_after(relu, [conv, sig])


def build_mlp():
    torch, nn = import_torch(), _nn()
    torch.manual_seed(0)
    return _finish(
        nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    )


# --- the digits CNN (the demo) -----------------------------------------------------------------------


def build_digits_cnn():
    torch, nn = import_torch(), _nn()

    class DigitsCNN(nn.Module):
        """1x8x8 grey digit -> 10 logits: Conv+BN+ReLU blocks, one residual Add, global average pool."""

        def __init__(self):
            super().__init__()
            self.block1 = _conv_bn(1, 16)
            self.block2 = _conv_bn(16, 32)
            self.res_a = _conv_bn(32, 32)
            self.res_b = _conv_bn(32, 32, act=None)
            self.down = _conv_bn(32, 64, stride=2)  # 8x8 -> 4x4
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.block2(self.block1(x))
            x = torch.relu(self.res_b(self.res_a(x)) + x)
            x = self.down(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    return _finish(DigitsCNN())


# --- bigger CNNs ---------------------------------------------------------------------------------------


def build_resnet_style():
    """ResNet-18 layout (basic blocks [2, 2, 2, 2], widths 64..512, 1x1 downsample branches), 100
    classes: 11.2M parameters. Input 3x96x96 keeps a CPU benchmark quick."""
    torch, nn = import_torch(), _nn()

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = _conv_bn(cin, cout, 3, stride)
            self.conv2 = _conv_bn(cout, cout, 3, 1, act=None)
            self.downsample = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            return torch.relu(self.conv2(self.conv1(x)) + identity)

    class ResNetStyle(nn.Module):
        def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=100):
            super().__init__()
            self.stem = nn.Sequential(_conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
            layers, cin = [], widths[0]
            for i, (w, n) in enumerate(zip(widths, blocks)):
                for j in range(n):
                    layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                    cin = w
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.pool(self.layers(self.stem(x)))
            return self.fc(torch.flatten(x, 1))

    torch.manual_seed(0)
    return _finish(ResNetStyle())


def build_mobilenetv2_style():
    """Inverted residuals: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection, residual
    Add when the shape allows."""
    torch, nn = import_torch(), _nn()

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act="relu6")]
            layers += [
                _conv_bn(hidden, hidden, 3, stride, groups=hidden, act="relu6"),
                _conv_bn(hidden, cout, 1, act=None),
            ]
            self.conv = nn.Sequential(*layers)
            self.use_res = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2Style(nn.Module):
        # (expand, channels, repeats, stride)
        config = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 2, 1), (6, 160, 2, 2))

        def __init__(self, classes=100):
            super().__init__()
            layers, cin = [_conv_bn(3, 32, 3, 2, act="relu6")], 32
            for t, c, n, s in self.config:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(_conv_bn(cin, 640, 1, act="relu6"))
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(640, classes)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    return _finish(MobileNetV2Style())


def build_mobilenetv3_style():
    """Depthwise blocks with HardSwish and squeeze-excitation (GAP -> 1x1 -> ReLU -> 1x1 -> HardSigmoid
    -> channel Mul)."""
    torch, nn = import_torch(), _nn()

    class SqueezeExcite(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.reduce = nn.Conv2d(c, max(8, c // r), 1)
            self.expand = nn.Conv2d(max(8, c // r), c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            s = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(s))))
            return x * s

    class Block(nn.Module):
        def __init__(self, cin, hidden, cout, k, stride, se, act):
            super().__init__()
            layers = [] if hidden == cin else [_conv_bn(cin, hidden, 1, act=act)]
            layers.append(_conv_bn(hidden, hidden, k, stride, groups=hidden, act=act))
            if se:
                layers.append(SqueezeExcite(hidden))
            layers.append(_conv_bn(hidden, cout, 1, act=None))
            self.conv = nn.Sequential(*layers)
            self.use_res = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV3Style(nn.Module):
        # (kernel, hidden, out, se, act, stride) - MobileNetV3-Small, shortened
        config = (
            (3, 16, 16, True, "relu", 2),
            (3, 72, 24, False, "relu", 2),
            (3, 88, 24, False, "relu", 1),
            (5, 96, 40, True, "hardswish", 2),
            (5, 240, 40, True, "hardswish", 1),
            (5, 120, 48, True, "hardswish", 1),
            (5, 288, 96, True, "hardswish", 2),
        )

        def __init__(self, classes=100):
            super().__init__()
            layers, cin = [_conv_bn(3, 16, 3, 2, act="hardswish")], 16
            for k, hidden, cout, se, act, s in self.config:
                layers.append(Block(cin, hidden, cout, k, s, se, act))
                cin = cout
            layers.append(_conv_bn(cin, 576, 1, act="hardswish"))
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Linear(576, 256), nn.Hardswish(), nn.Linear(256, classes))

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    return _finish(MobileNetV3Style())


def build_densenet_style():
    """Dense blocks (pre-activation BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, outputs Concat-ed onto the input)
    and transitions (BN-ReLU-Conv1x1-AvgPool). Its BatchNorms follow a Concat, not a Conv."""
    torch, nn = import_torch(), _nn()

    class DenseLayer(nn.Module):
        def __init__(self, cin, growth):
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
            )  # fmt: skip

        def forward(self, x):
            return torch.cat([x, self.body(x)], 1)

    class DenseNetStyle(nn.Module):
        def __init__(self, growth=12, blocks=(4, 4, 4), classes=100):
            super().__init__()
            c = 2 * growth
            layers = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
            for i, n in enumerate(blocks):
                for _ in range(n):
                    layers.append(DenseLayer(c, growth))
                    c += growth
                if i < len(blocks) - 1:
                    layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                    c //= 2
            layers += [nn.BatchNorm2d(c), nn.ReLU()]
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(c, classes)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    torch.manual_seed(0)
    return _finish(DenseNetStyle())


def build_yolo_style():
    """A YOLOv8-like detector: Conv+BN+SiLU, C2f blocks (``chunk`` -> Split, bottlenecks, Concat), an
    SPPF-ish MaxPool stack, a top-down neck (nearest Upsample -> Resize, Concat) and three heads."""
    torch, nn = import_torch(), _nn()

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1 = _conv_bn(c, c, 3, act="silu")
            self.cv2 = _conv_bn(c, c, 3, act="silu")

        def forward(self, x):
            return x + self.cv2(self.cv1(x))

    class C2f(nn.Module):
        def __init__(self, cin, cout, n=1):
            super().__init__()
            self.c = cout // 2
            self.cv1 = _conv_bn(cin, 2 * self.c, 1, act="silu")
            self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
            self.cv2 = _conv_bn((2 + n) * self.c, cout, 1, act="silu")

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            for m in self.m:
                y.append(m(y[-1]))
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1 = _conv_bn(c, c // 2, 1, act="silu")
            self.pool = nn.MaxPool2d(5, 1, 2)
            self.cv2 = _conv_bn(c * 2, c, 1, act="silu")

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.pool(x)
            y2 = self.pool(y1)
            return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))

    class YoloStyle(nn.Module):
        def __init__(self, classes=8):
            super().__init__()
            w = (16, 32, 64, 128)
            self.stem = _conv_bn(3, w[0], 3, 2, act="silu")  # /2
            self.s1 = nn.Sequential(_conv_bn(w[0], w[1], 3, 2, act="silu"), C2f(w[1], w[1]))  # /4
            self.s2 = nn.Sequential(_conv_bn(w[1], w[2], 3, 2, act="silu"), C2f(w[2], w[2]))  # /8  P3
            self.s3 = nn.Sequential(_conv_bn(w[2], w[3], 3, 2, act="silu"), C2f(w[3], w[3]))  # /16 P4
            self.s4 = nn.Sequential(_conv_bn(w[3], w[3], 3, 2, act="silu"), SPPF(w[3]))  # /32 P5
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.n4 = C2f(w[3] + w[3], w[3])
            self.n3 = C2f(w[3] + w[2], w[2])
            out = 4 + classes
            self.heads = nn.ModuleList(nn.Conv2d(c, out, 1) for c in (w[2], w[3], w[3]))

        def forward(self, x):
            p3 = self.s2(self.s1(self.stem(x)))
            p4 = self.s3(p3)
            p5 = self.s4(p4)
            n4 = self.n4(torch.cat([self.up(p5), p4], 1))
            n3 = self.n3(torch.cat([self.up(n4), p3], 1))
            return tuple(h(f) for h, f in zip(self.heads, (n3, n4, p5)))

    torch.manual_seed(0)
    return _finish(YoloStyle())


# --- transformer ---------------------------------------------------------------------------------------


BERT_VOCAB = 1000


def build_bert_encoder(hidden: int = 64, heads: int = 4, layers: int = 2, ffn: int = 256):
    """A 2-layer BERT-style encoder in explicit math: token + position embeddings, LayerNorm,
    self-attention as MatMul / Softmax / MatMul with 4 heads (hidden 64), a GELU feed-forward (256),
    post-LayerNorm residuals. Input int64 token ids ``[batch, seq]``; output ``[batch, seq, 64]``.
    The sizes are arguments so benchmarks can build a BERT-base-wide variant (768 / 12 / 3072)."""
    torch, nn = import_torch(), _nn()

    class Attention(nn.Module):
        def __init__(self, hidden, heads):
            super().__init__()
            self.heads, self.head_dim = heads, hidden // heads
            self.q = nn.Linear(hidden, hidden)
            self.k = nn.Linear(hidden, hidden)
            self.v = nn.Linear(hidden, hidden)
            self.out = nn.Linear(hidden, hidden)

        def split(self, x):  # [b, s, h*d] -> [b, h, s, d]
            b, s, _ = x.shape
            return x.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)

        def forward(self, x):
            b, s, hidden = x.shape
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            return self.out(ctx.transpose(1, 2).reshape(b, s, hidden))

    class Layer(nn.Module):
        def __init__(self, hidden, heads, ffn):
            super().__init__()
            self.attn = Attention(hidden, heads)
            self.ln1 = nn.LayerNorm(hidden)
            self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
            self.ln2 = nn.LayerNorm(hidden)

        def forward(self, x):
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.ffn(x))

    class BertEncoder(nn.Module):
        def __init__(self, vocab=BERT_VOCAB, hidden=64, heads=4, layers=2, ffn=256, max_positions=512):
            super().__init__()
            self.tokens = nn.Embedding(vocab, hidden)
            self.positions = nn.Embedding(max_positions, hidden)
            self.ln = nn.LayerNorm(hidden)
            self.layers = nn.ModuleList(Layer(hidden, heads, ffn) for _ in range(layers))

        def forward(self, input_ids):
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            x = self.ln(self.tokens(input_ids) + self.positions(pos))
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    module = BertEncoder(hidden=hidden, heads=heads, layers=layers, ffn=ffn)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape) * 0.1)
    return module.eval()


# --- registry ------------------------------------------------------------------------------------------


def _spec(name, builder, shape, kind, description, **kw) -> ModelSpec:
    return ModelSpec(name=name, builder=builder, input_shape=shape, kind=kind, description=description, **kw)


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("conv_bn", build_conv_bn, (3, 16, 16), "cnn", "Conv -> BatchNorm"),
        _spec("conv_bn_relu_residual", build_conv_bn_relu_residual, (3, 16, 16), "cnn",
              "Conv+BN+ReLU stem, a residual block (Conv+BN+ReLU, Conv+BN, Add, ReLU)"),
        _spec("convtranspose_bn", build_convtranspose_bn, (4, 8, 8), "cnn", "Conv -> ConvTranspose(s2) -> BN -> ReLU"),
        _spec("linear_bn1d", build_linear_bn1d, (16,), "mlp", "Linear -> BatchNorm1d -> ReLU -> Linear"),
        _spec("linear_affine", build_linear_affine, (16,), "mlp", "Linear -> x*scale + shift (constants) -> ReLU -> Linear"),
        _spec("shared_weights", build_shared_weights, (3, 16, 16), "cnn",
              "one Conv weight used by two Conv nodes (each with its own BN); one Linear used twice"),
        _spec("dead_branch", build_dead_branch, (3, 16, 16), "cnn",
              "Conv+BN+ReLU -> Conv head, plus a Conv+Sigmoid branch that reaches no output",
              postprocess=_add_dead_branch),
        _spec("digits_cnn", build_digits_cnn, (1, 8, 8), "cnn",
              "the demo: 8x8 digits, Conv+BN+ReLU blocks, residual Add, GAP, Linear(10)"),
        _spec("resnet_style", build_resnet_style, (3, 96, 96), "cnn", "ResNet-18 layout, 11.2M params, 100 classes"),
        _spec("mobilenetv2_style", build_mobilenetv2_style, (3, 64, 64), "cnn", "depthwise inverted residuals, ReLU6"),
        _spec("mobilenetv3_style", build_mobilenetv3_style, (3, 64, 64), "cnn",
              "depthwise, HardSwish, squeeze-excitation channel Mul"),
        _spec("densenet_style", build_densenet_style, (3, 32, 32), "cnn", "dense blocks: Concat, pre-activation BN"),
        _spec("yolo_style", build_yolo_style, (3, 64, 64), "cnn",
              "SiLU, Split (chunk), Concat, Resize (nearest upsample), multi-scale neck, 3 outputs"),
        _spec("mlp", build_mlp, (64,), "mlp", "Linear-ReLU-Linear-ReLU-Linear"),
        _spec("bert_encoder", build_bert_encoder, (16,), "transformer",
              "2-layer BERT-style encoder, hidden 64, 4 heads, explicit attention math, GELU FFN",
              input_names=("input_ids",), input_dtype="int64", vocab_size=BERT_VOCAB,
              dynamic_axes={"input_ids": {1: "seq"}, "output": {1: "seq"}}),
    )
}  # fmt: skip

#: zoo models that export at opset 11 with the TorchScript exporter (all of them, at present).
OPSET11_MODELS: tuple[str, ...] = tuple(n for n, s in MODELS.items() if s.opset11)


def names(kind: str | None = None) -> list[str]:
    """Names of the zoo models, optionally only one ``kind`` (``cnn``, ``mlp``, ``transformer``)."""
    return [n for n, s in MODELS.items() if kind is None or s.kind == kind]


def _get(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"zoo: no model {name!r}; known: {', '.join(MODELS)}") from None


def build(name: str):
    """A fresh, deterministic ``torch.nn.Module`` (eval mode) of zoo model ``name``."""
    return _get(name).builder()


def example_inputs(name: str, batch: int = 1, seq: int | None = None, seed: int = 0) -> tuple[Any, ...]:
    """Example input tensors of zoo model ``name`` (a tuple, one per graph input)."""
    return _get(name).example_inputs(batch=batch, seq=seq, seed=seed)


def export_model(
    name_or_module: Any,
    example_inputs: Any = None,
    *,
    opset: int = 18,
    dynamo: bool = True,
    dynamic_batch: bool = True,
) -> ir.Model:
    """Export a zoo model (by name) or any module with :func:`onnxforge.torch_export.export`.

    For a name, the spec's input names, extra dynamic axes (bert: ``seq``) and post-processing (the
    dead branch) apply, and ``example_inputs`` defaults to the spec's. For a module,
    ``example_inputs`` is required.
    """
    if isinstance(name_or_module, str):
        spec = _get(name_or_module)
        module = spec.builder()
        inputs = example_inputs if example_inputs is not None else spec.example_inputs()
        model = export(
            module,
            inputs,
            opset=opset,
            dynamo=dynamo,
            dynamic_batch=dynamic_batch,
            dynamic_axes=spec.dynamic_axes or None,
            input_names=spec.input_names,
        )
        if spec.postprocess is not None:
            spec.postprocess(model, module)
        model.graph.name = spec.name
        return model
    if example_inputs is None:
        raise ValueError("zoo.export_model: example_inputs is required when exporting a module")
    return export(name_or_module, example_inputs, opset=opset, dynamo=dynamo, dynamic_batch=dynamic_batch)


def export_cached(name: str, *, opset: int = 18, dynamo: bool = True, cache_dir: str | os.PathLike | None = None) -> ir.Model:
    """:func:`export_model` of zoo model ``name`` through an on-disk cache (exports take seconds).

    The key covers the model name, opset, exporter, the source of this module and of
    :mod:`onnxforge.torch_export`, and the torch / onnxscript / onnx_ir versions, so an edit invalidates it.
    ``cache_dir`` defaults to ``$ONNXFORGE_CACHE_DIR/zoo`` or ``~/.cache/onnxforge/zoo``. Every call
    returns a fresh model (passes modify models in place). Writes are atomic, so parallel test workers
    can share the folder.
    """
    from onnxforge.torch_export import save_atomic

    torch = import_torch()
    import onnxscript

    if cache_dir is None:
        root = os.environ.get("ONNXFORGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "onnxforge")
        cache_dir = os.path.join(root, "zoo")
    digest = hashlib.sha256()
    for part in (
        name, str(opset), str(dynamo), torch.__version__, onnxscript.__version__, ir.__version__,
        Path(__file__).read_text(), Path(inspect.getfile(save_atomic)).read_text(),
    ):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0")
    path = Path(cache_dir) / f"{name}-opset{opset}-{'dynamo' if dynamo else 'torchscript'}-{digest.hexdigest()[:16]}.onnx"
    if path.exists():
        try:
            return ir.load(path)
        except Exception:  # a damaged cache entry: export again
            pass
    model = export_model(name, opset=opset, dynamo=dynamo)
    with contextlib.suppress(OSError, ModelSaveError):  # a read-only cache only costs time
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(model, path)
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for stale in path.parent.glob(f"{prefix}*.onnx"):  # entries of older sources
            if stale != path and len(stale.name) == len(path.name):
                stale.unlink(missing_ok=True)
    return model


def export_opset11(name: str) -> ir.Model:
    """Zoo model ``name`` exported at opset 11 by the TorchScript exporter (dynamic batch)."""
    if not _get(name).opset11:
        raise ValueError(f"zoo: {name!r} does not export at opset 11; those that do: {OPSET11_MODELS}")
    return export_model(name, opset=11, dynamo=False)


def export_raw_bytes(module, example_inputs: tuple, *, dynamo: bool, opset: int) -> bytes:
    """Exactly what ``torch.onnx.export`` writes, with a dynamic batch axis and none of onnxforge's
    cleanup or torch's optimizer: tests of cleanup and folding passes need the exporter's own
    Constant nodes, unfolded BatchNorms and shape arithmetic. Inputs are named ``x0``, ``x1``, ...
    for the TorchScript exporter."""
    import io
    import warnings

    torch = import_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(
                module,
                example_inputs,
                dynamo=True,
                optimize=False,  # its optimizer would fold BatchNorm and constants already
                opset_version=opset,
                dynamic_shapes=tuple({0: torch.export.Dim("batch")} for _ in example_inputs),
                verbose=False,
            )
            return ir.serde.serialize_model(program.model).SerializeToString()
        f = io.BytesIO()
        names = [f"x{i}" for i in range(len(example_inputs))]
        torch.onnx.export(
            module,
            example_inputs,
            f,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=False,  # otherwise the exporter itself folds BatchNorm and constants
            input_names=names,
            dynamic_axes={n: {0: "batch"} for n in names},
        )
        return f.getvalue()


def constants_as_nodes(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every initializer turned into a ``Constant`` node (as PaddlePaddle's
    exporter writes weights); subgraphs included. The result has no initializers and the same outputs."""
    model = ir.from_proto(ir.to_proto(model))  # deep copy
    for graph in (model.graph, *(g for n in ir.traversal.RecursiveGraphIterator(model.graph)
                                 for a in n.attributes.values()
                                 for g in _subgraphs(a))):  # fmt: skip
        constants = []
        for name, value in list(graph.initializers.items()):
            tensor = value.const_value
            graph.initializers.pop(name)
            node = ir.node("Constant", [], attributes={"value": ir.AttrTensor("value", tensor)}, name=f"Constant_{name}")
            out = node.outputs[0]
            out.dtype, out.shape = value.dtype, value.shape
            value.replace_all_uses_with(out)
            if value.is_graph_output():
                graph.outputs[graph.outputs.index(value)] = out
            value.name = None
            out.name = name
            constants.append(node)
        graph.extend(constants)
        graph.sort()
    return model


def _subgraphs(attr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def feeds(name: str, batch: int = 1, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Example inputs of zoo model ``name`` as an onnxruntime feed dict."""
    spec = _get(name)
    tensors = spec.example_inputs(batch=batch, seq=seq, seed=seed)
    return {n: t.numpy() for n, t in zip(spec.input_names, tensors)}
