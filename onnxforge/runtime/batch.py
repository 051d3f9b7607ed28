"""Which axis of each model output is the batch (samples) axis.

Most models put samples on axis 0 of every output, but not all: a CTC text recognizer's LSTM
emits ``(T, N, C)`` logits (time first). Code that batches samples, slices the padding off a
fixed-batch run, or splits outputs per sample must use each output's own batch axis; slicing axis
0 of ``(T, 1, C)`` keeps the first time step, not the first sample.

Measured, not guessed: the model runs on one sample and on two (the same sample twice), with its
first input dimension made symbolic where it was fixed; an output's batch axis is the one axis
whose size went from 1 to 2. Where the model cannot run on two samples, or no axis (or more than
one) did that (an output that does not depend on the batch; a fixed-batch reshape that folds the
samples into another axis), axis 0 is assumed, as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np


def batch_axes(model_bytes: bytes, sample: Mapping[str, np.ndarray]) -> dict[str, int]:
    """``{output name: batch axis}`` of the model, from runs on ``sample`` (one sample per input,
    batch axis 0) and on it twice (module docstring)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(model_bytes)
    names = [o.name for o in model.graph.output]
    for v in model.graph.input:
        dims = v.type.tensor_type.shape.dim
        if v.name in sample and len(dims) and not dims[0].dim_param:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "onnxforge_batch"
    for v in model.graph.output:  # declared output shapes would pin the batch (or warn)
        v.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    one = {k: np.asarray(v)[:1] for k, v in sample.items()}
    two = {k: np.concatenate([v, v]) for k, v in one.items()}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            a, b = sess.run(names, one), sess.run(names, two)
    except Exception:  # noqa: BLE001 - a model that cannot run two samples: assume axis 0
        return {n: 0 for n in names}
    axes = {}
    for n, x, y in zip(names, a, b):
        x, y = np.asarray(x), np.asarray(y)
        # the batch axis holds one entry per sample: 1 -> 2 (an axis that doubled from 3,549 to
        # 7,098 is a fixed-batch model's reshape folding the samples into its anchors, not a batch)
        hits = [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if (p, q) == (1, 2)]
        axes[n] = hits[0] if len(hits) == 1 and x.ndim == y.ndim else 0
    return axes
