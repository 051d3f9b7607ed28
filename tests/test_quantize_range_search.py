"""``quantize-int8(range_search=...)``: activation ranges narrowed by the int8 model's output error.

The net (exported from torch) has a depthwise conv whose input channels differ 30x in spread, the
case per-tensor uint8 activations serve worst: the wide channels set the grid, the narrow ones get a
few levels each, and a depthwise conv cannot average their rounding noise away. Checked: the search
narrows that range, the int8 output error against the float model falls on inputs it never saw
(outputs compared by name in onnxruntime), the int32 biases stay consistent with the new scales (the
fused onnxruntime kernels agree with the simulated QDQ graph), and a decision record replays the
search byte for byte without measuring.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.passes import PassContext, create_pass
from onnxforge.testing.numerics import copy_model, random_inputs
from onnxforge.passes.quantize.fallback import output_error

torch = pytest.importorskip("torch")


class _DepthwiseNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))


@pytest.fixture(scope="module")
def net():
    from onnxforge.torch_export import export

    torch.manual_seed(0)
    m = _DepthwiseNet().eval()
    with torch.no_grad():  # 4 wide channels (30x), whose weight downstream is 30x smaller
        m.stem.weight[:4] *= 30.0
        m.stem.bias[:4] *= 30.0
        m.pw.weight[:, :4] /= 30.0
    model = export(m, (torch.randn(1, 3, 12, 12),))
    feeds = [random_inputs(model, seed=i, default_dim=1) for i in range(48)]
    return model, feeds


def _quantize(model, feeds, **options):
    q = copy_model(model)
    result = create_pass("quantize-int8", {"calibration": "minmax", **options},
                         PassContext(calibration_data=feeds))(q)
    return q, result.stats


def _outputs(model, feeds, optimize="all"):
    from onnxforge.runtime.session import make_session

    sess = make_session(model, ("cpu",), optimize=optimize)
    names = [o.name for o in model.graph.outputs]
    return [[r[n] for n in names] for r in (sess.run(f) for f in feeds)]


def test_range_search_lowers_the_output_error_on_unseen_inputs(net, tmp_path):
    model, feeds = net
    calib, held = feeds[:32], feeds[32:]
    plain, _ = _quantize(model, calib)
    record = tmp_path / "decisions.json"
    searched, stats = _quantize(model, calib, range_search="depthwise", decisions=str(record))
    info = stats.details["range_search"]
    assert info["tensors"] == 1 and info["factors"], info  # the depthwise input, narrowed
    assert info["output_error"][1] < info["output_error"][0]
    ref = _outputs(model, held, optimize="disable")
    before, after = output_error(ref, _outputs(plain, held)), output_error(ref, _outputs(searched, held))
    print(f"\nheld-out output error: calibrated ranges {before:.5f}, range_search {after:.5f} ({info['factors']})")
    assert after <= 0.9 * before, (before, after)
    # the fused integer kernels and the simulated QDQ graph agree: biases re-quantized on the new scales
    fused, simulated = _outputs(searched, held[:4]), _outputs(searched, held[:4], optimize="disable")
    for f, s in zip(fused, simulated):
        np.testing.assert_allclose(f[0], s[0], atol=0.05 * float(np.abs(s[0]).max()))
    # replay: the record holds the factors; the rebuild measures nothing and writes the same bytes
    assert json.loads(record.read_text())["range_factors"] == info["factors"]
    again, stats2 = _quantize(model, calib, range_search="depthwise", decisions=str(record))
    assert "range_search" not in stats2.details
    assert ir.serde.serialize_model(again).SerializeToString() == ir.serde.serialize_model(searched).SerializeToString()


def test_range_search_option_is_checked():
    from onnxforge.errors import PassOptionError

    with pytest.raises(PassOptionError, match="range_search"):
        create_pass("quantize-int8", {"range_search": "everything"}, PassContext())


def test_a_derived_range_is_searched_through_its_source():
    """HardSwish as Paddle exports it, ``x * clip(x + 3, 0, 6) / 6``: the ``/ 6`` is folded into a
    DequantizeLinear scale, so the depthwise conv's input range is derived from the Mul's, and the
    search narrows that one."""
    from onnxforge.torch_export import export

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)

        def forward(self, x):
            y = self.stem(x)
            return self.dw(y * torch.clamp(y + 3.0, 0.0, 6.0) / 6.0)

    torch.manual_seed(0)
    model = export(Net().eval(), (torch.randn(1, 3, 8, 8),))
    rng = np.random.default_rng(0)
    name = model.graph.inputs[0].name
    feeds = [{name: rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    _, stats = _quantize(model, feeds, range_search="depthwise")
    assert stats.details["range_search"]["tensors"] == 1, stats.details["range_search"]
