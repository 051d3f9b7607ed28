"""prune-channels on dynamo (torch.export) graphs: attention heads as units, Split sizes rewritten.

The two exports take ~45 s cold; the ``zoo_model`` fixture caches them on disk across runs.
"""

from __future__ import annotations

import pytest

from onnxforge.testing import numerics

from test_prune_channels import _copy, assert_valid, exported, prune  # noqa: F401  (fixture)

from onnxforge.testing import zoo


def test_dynamo_bert_prunes_whole_heads(exported):
    model = exported("bert_encoder", dynamo=True, opset=18)
    reference = _copy(model)
    stats = prune(model, ratio=0.3)
    assert_valid(model)
    feeds = zoo.feeds("bert_encoder", batch=2)
    assert numerics.run(model, feeds)[0].shape == numerics.run(reference, feeds)[0].shape
    # 4 heads of 16 -> 3 heads: Q/K/V weights keep 48 columns; FFN 256 -> 180.
    widths = sorted({v.const_value.shape[1] for v in model.graph.initializers.values()
                     if v.const_value is not None and len(v.const_value.shape) == 2
                     and v.const_value.shape[0] == 64})
    assert 48 in widths and 180 in widths, widths
    head_rows = [g for g in stats.details["groups"] if g["removed"] == 1 and g["channels"] == 4]
    assert len(head_rows) == 2, stats.details["groups"]


def test_dynamo_yolo_split_sizes_rewritten(exported):
    model = exported("yolo_style", dynamo=True, opset=18)
    reference = _copy(model)
    stats = prune(model, ratio=0.3)
    assert stats.counts["splits_rewritten"] >= 1
    assert_valid(model)
    feeds = zoo.feeds("yolo_style", batch=1)
    assert [o.shape for o in numerics.run(model, feeds)] == [o.shape for o in numerics.run(reference, feeds)]
