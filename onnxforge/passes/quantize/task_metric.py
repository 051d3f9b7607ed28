"""A user's task metric as ``quantize-int8``'s accuracy budget, from the CLI or a config file.

``onnxforge optimize ... --metric module:function`` (or ``metric = "module:function"`` in the config)
makes ``max_drop`` a drop of *that* metric on the calibration data instead of its proxy (expected top-1
flips, ``1 - cosine``). The function is the one ``onnxforge tune --metric`` takes:
``function(outputs, data) -> float`` or ``function(outputs, data, float_outputs) -> float``, higher is
better, with ``outputs`` / ``float_outputs`` as ``{output name: array}`` (samples concatenated on
axis 0) and ``data`` the calibration arrays by input name. The three-parameter form scores
agreement with the float model (detections' F1, decoded strings) and needs no labels. ``max_drop`` is
in the function's unit: ``max_drop=0.01`` is one point of an F1 in ``[0, 1]``.

With labels: when the calibration ``.npz`` has an array ``labels`` (one entry per sample, not a model
input; :class:`~onnxforge.runtime.data.CalibrationData`), ``data["labels"]`` holds the labels of the
samples the function is called on, so ``max_drop`` counts accuracy against the truth (for a classifier,
``--metric top1`` is built in: top-1 accuracy against integer ``labels``). The pass calls
the metric on any subset of the feeds (one feed alone, for ``budget_confidence``'s standard error),
so each feed's labels are found by the bytes of its inputs. Why it matters: agreement with the float
model counts changes between answers the float model itself gets wrong as losses; on the trained
PicoDet layout model, int8 with its first 8 convs float agreed with fp32 on 95 % of the boxes and
lost nothing against the true blocks (BENCHMARKS.md, trained-model suite, run 17).

:class:`TaskMetric` adapts it to the pass's ``metric(outputs_per_feed, feeds, float_outputs_per_feed)``
(:mod:`.fallback`), pairing outputs with their names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxforge.errors import PipelineSpecError


class TaskMetric:
    """``metric(outputs_per_feed, feeds, float_outputs_per_feed) -> float`` over named, concatenated arrays;
    ``labelled``: the calibration data, whose ``labels`` (if any) reach the function as ``data["labels"]``."""

    def __init__(self, spec: str, output_names: Sequence[str], labelled=None):
        from onnxforge.tune.evaluate import resolve_metric

        if ":" not in spec and spec != "top1":
            raise PipelineSpecError(f"--metric {spec!r}: give top1 (with labels) or module:function (higher is "
                                    "better), called as function(outputs, data[, float_outputs]) with arrays by name")
        self.spec = spec
        self.metric = resolve_metric(spec)
        self.names = list(output_names)
        # feed bytes -> that feed's labels (the calibration data's 'labels' array, cut like its feeds)
        self.labels: dict[bytes, np.ndarray] = {}
        if labelled is not None and getattr(labelled, "has_labels", False):
            for i, feed in enumerate(labelled):
                self.labels[feed_key(feed)] = np.asarray(labelled.label_of(i))
        # the built-in top1 is tune's, in percent; max_drop counts fractions (0.01 = one point)
        self.scale = 0.01 if spec == "top1" else 1.0
        if spec == "top1" and not self.labels:
            raise PipelineSpecError("--metric top1 needs the true classes: an integer array 'labels' (one per "
                                    "sample) in the calibration .npz beside the inputs")

    def _named(self, per_feed: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
        if any(len(outs) != len(self.names) for outs in per_feed):
            raise PipelineSpecError(f"--metric {self.spec!r}: the model must keep its {len(self.names)} outputs")
        return {name: np.concatenate([np.asarray(outs[j]) for outs in per_feed]) for j, name in enumerate(self.names)}

    def __call__(self, outputs_per_feed, feeds, float_outputs_per_feed) -> float:
        data = {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in feeds[0]} if feeds else {}
        if self.labels and feeds:
            found = [self.labels.get(feed_key(f)) for f in feeds]
            if any(y is None for y in found):  # budget data other than the calibration data (eval_data)
                raise PipelineSpecError(f"--metric {self.spec!r}: labels are known for the calibration samples only")
            data["labels"] = np.concatenate(found)
        return self.scale * float(self.metric.fn(self._named(outputs_per_feed), self._named(float_outputs_per_feed), data))


def feed_key(feed) -> bytes:
    """A feed's identity: the digest of its arrays' names, shapes, types and bytes."""
    import hashlib

    h = hashlib.sha1()
    for name in sorted(feed):
        a = np.ascontiguousarray(feed[name])
        h.update(f"{name}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.digest()
