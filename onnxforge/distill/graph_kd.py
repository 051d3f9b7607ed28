"""Distill an ONNX student against an ONNX teacher on unlabeled inputs (no torch module needed).

The teacher runs once in onnxruntime over the data; its outputs are cached. The student runs in
torch through :func:`~onnxforge.distill.graph_module.graph_module` (its graph, its weights as
parameters) and is fine-tuned with :func:`~onnxforge.distill.train.train_kd` (loss: see there;
without labels it is the soft-target term only,
``T^2 * KL(softmax(t / T) || softmax(s / T))``), then the trained weights are written back into a
copy of the student graph: same nodes, same names, new initializer values.

What the loss compares: for a graph output produced by ``Softmax`` over the last axis, the
``Softmax`` *input* (the logits; a KL between two softmaxes of probabilities would be nearly flat;
in a quantized student, the value before the Q/DQ pair that rounds them), else the output itself.
Both models must have a value of that name (a pruned or re-fitted student keeps the teacher's
names). Float outputs only; every other output is left out of the loss.

With ``loss="mse"`` (outputs that are not logits: box regressions, heat maps) the loss is
the mean squared error of the *standardised* outputs: each channel of the last axis shifted and
divided by the teacher's mean and standard deviation over the data, so that a box coordinate in
pixels and a probability weigh alike. ``loss="auto"`` picks per output: KL on the logits of a
``Softmax`` output, the binary KL (``"bce"`` in :mod:`~onnxforge.distill.train`) on an output that is
a ``Sigmoid``'s probabilities (through layout-only ops: Transpose, Reshape, ..., and Q/DQ), the
standardised MSE on anything else. A detector's class scores then cost by how far they move in
probability, not by how far they move relative to their own spread: a rare class whose scores stay
near 0 has a tiny spread, and the standardised MSE made its noise weigh like a flipped box.

A quantized (QDQ) student is trained quantization-aware: its rounding steps are simulated and its
int8 weights trained on their grid (:mod:`onnxforge.distill.fake_quant`).

Inputs are stacked along axis 0 (the batch axis): the student must accept a batch larger than one
(exported models with a dynamic batch do); a model whose batch is fixed at 1 trains sample by
sample (slow, but correct).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxforge.distill.graph_module import check, graph_module, write_back
from onnxforge.distill.train import KDConfig, TrainResult, train_kd
from onnxforge.errors import CalibrationDataError, UnsupportedModelError

logger = logging.getLogger(__name__)

__all__ = ["LOSSES", "GraphDistillResult", "distill_graph", "kd_loss_kinds", "kd_targets"]

LOSSES = ("kl", "mse", "auto")  # what distill_graph's ``loss`` (KDConfig.loss) may be

# ops that move or re-encode values without changing what they are (a Sigmoid's probabilities stay
# probabilities through them)
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                         "QuantizeLinear", "DequantizeLinear", "Concat"})


@dataclass
class GraphDistillResult:
    model: ir.Model          # the student with trained weights
    train: TrainResult
    targets: list[str]       # the values the loss compared
    loss_kinds: list[str]    # ... and how (kl, mse, bce), one per target
    check_error: float       # torch runner vs onnxruntime before training (relative)


def kd_targets(student: ir.Model) -> list[str]:
    """Names of the values the KD loss compares (see the module docstring)."""
    names = []
    for out in student.graph.outputs:
        if out.dtype is not None and not out.dtype.is_floating_point():
            continue
        node = out.producer()
        if node is not None and node.op_type == "Softmax" and node.inputs[0] is not None and node.inputs[0].name:
            axis = node.attributes.get("axis")
            rank = len(out.shape) if out.shape is not None else None
            a = -1 if axis is None else int(axis.value)
            if a == -1 or (rank is not None and a == rank - 1):
                names.append(_before_qdq(node.inputs[0]).name)
                continue
        names.append(out.name)
    return names


def _before_qdq(value: ir.Value) -> ir.Value:
    """The float value a ``QuantizeLinear -> DequantizeLinear`` pair rounds, else ``value``: a quantized
    student's logits are named as in its teacher only before the pair (PP-OCRv4's recognizer: its
    ``Add`` before the Softmax is quantized)."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None:
        return value
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None or not q.inputs[0].name:
        return value
    return q.inputs[0]


def _is_probability(value: ir.Value) -> bool:
    """Whether ``value`` is a Sigmoid's output, through layout-only ops (every Concat input too)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None:
            return False
        if node.op_type == "Sigmoid":
            continue
        if node.op_type not in _LAYOUT_OPS or node.inputs[0] is None:
            return False
        stack.extend(i for i in (node.inputs if node.op_type == "Concat" else node.inputs[:1]) if i is not None)
    return True


def kd_loss_kinds(student: ir.Model, targets: Sequence[str], loss: str) -> list[str]:
    """The loss kind of each KD target (:data:`~onnxforge.distill.train.LOSS_KINDS`) for ``loss``."""
    if loss != "auto":
        return [loss] * len(targets)
    outputs = {v.name: v for v in student.graph.outputs}
    kinds = []
    for name in targets:
        if name not in outputs:
            kinds.append("kl")  # kd_targets chose a Softmax's input: logits
        elif _is_probability(outputs[name]):
            kinds.append("bce")
        else:
            kinds.append("mse")
    return kinds


def _stack(feeds: Sequence[Mapping[str, np.ndarray]], names: list[str]) -> list[np.ndarray]:
    try:
        return [np.ascontiguousarray(np.concatenate([np.asarray(f[n]) for f in feeds], axis=0)) for n in names]
    except KeyError as exc:
        raise CalibrationDataError(f"distill: a feed has no array for input {exc}") from None
    except ValueError as exc:
        raise CalibrationDataError(f"distill: feeds do not stack along the batch axis: {exc}") from None


def distill_graph(
    teacher: ir.Model,
    student: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    config: KDConfig | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> GraphDistillResult:
    """Fine-tune ``student``'s weights so its outputs follow ``teacher``'s on ``feeds`` (unlabeled).

    Returns a new model (``student`` is not changed). Raises
    :class:`~onnxforge.errors.UnsupportedModelError` when the student has an op the torch runner
    does not have, or when the runner disagrees with onnxruntime on the first feed.
    """
    from onnxforge.runtime.activations import collect
    from onnxforge.torch_export import import_torch

    torch = import_torch()
    config = config or KDConfig()
    loss = config.loss if isinstance(config.loss, str) else None
    if loss not in LOSSES:
        raise ValueError(f"distill: loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
    if len(feeds) < 2:
        raise CalibrationDataError(f"distill: needs at least 2 inputs, got {len(feeds)}")
    targets = kd_targets(student)
    if not targets:
        raise UnsupportedModelError("distill: the student has no float output to distill")
    module = graph_module(student)
    error = check(module, student, feeds[0])
    got = collect(teacher, feeds, targets)
    missing = [t for t in targets if t not in got or len(got[t]) != len(feeds)]
    if missing:
        raise UnsupportedModelError(f"distill: the teacher has no value named {missing}; "
                                    f"distill a student derived from this teacher (names kept)")
    teacher_out = [torch.from_numpy(np.concatenate(got[t], axis=0)) for t in targets]
    kinds = kd_loss_kinds(student, targets, loss)
    config = KDConfig(**{**config.__dict__, "loss": tuple(kinds)})
    standardise = [(None, None)] * len(targets)
    for i, t in enumerate(teacher_out):  # mse: per channel of the last axis, from the teacher's values
        if kinds[i] != "mse":
            continue
        flat = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        standardise[i] = (mean, std)
        teacher_out[i] = ((t.reshape(-1, flat.shape[-1]) - mean) / std).reshape(t.shape)
    inputs = _stack(feeds, module.input_names)
    n = len(inputs[0])
    fixed_batch = [v.shape[0] for v in student.graph.inputs if v.name in module.input_names and v.shape is not None
                   and len(v.shape) > 0 and isinstance(v.shape[0], int)]
    if fixed_batch and any(b != 1 for b in fixed_batch):
        raise UnsupportedModelError(f"distill: the student's batch axis is fixed at {fixed_batch}")
    batch = 1 if fixed_batch else config.batch_size
    if batch != config.batch_size:
        logger.warning("distill: the student's batch is fixed at 1; training sample by sample")
        config = KDConfig(**{**config.__dict__, "batch_size": 1})
    index = np.arange(n, dtype=np.int64)

    class Student(torch.nn.Module):
        """The graph module, taking (inputs..., sample index) and returning the KD target values."""

        def __init__(self):
            super().__init__()
            self.graph = module

        def forward(self, *args):
            _, values = self.graph(*args[:-1], extra=targets)
            return tuple(v if mean is None else (v - mean) / std for v, (mean, std) in zip(values, standardise))

    class Teacher(torch.nn.Module):
        """The teacher's cached values, looked up by sample index."""

        def forward(self, *args):
            idx = args[-1]
            return tuple(t[idx] for t in teacher_out)

    trained = train_kd(Student(), Teacher(), inputs + [index], None, config, progress=progress)
    out = write_back(module, student)
    logger.info("distill: %d samples, best epoch %d of %d", n, trained.best_epoch, len(trained.history))
    return GraphDistillResult(out, trained, targets, kinds, error)
