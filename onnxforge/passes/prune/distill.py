"""``distill``: fine-tune a pruned (or re-fitted) model's weights to its teacher's outputs. Lossy.

The recovery step after ``prune-channels`` (and ``reconstruct``) for models that do not survive a
channel cut with a layer-wise re-fit alone: the student is trained end to end by knowledge
distillation (Hinton et al. 2015) against the teacher on *unlabeled* calibration inputs, in torch,
from the ONNX graph itself (:mod:`onnxforge.distill.graph_kd`; no torch module of the model needed)::

    min_W  T^2 * KL( softmax(t(x) / T) || softmax(s_W(x) / T) ),  averaged over the inputs x

with ``t`` the teacher's logits (the input of a final ``Softmax``, else the output), ``s_W`` the
student's (``loss="mse"``: the mean squared error of the standardised outputs instead, for outputs
that are not logits, e.g. a detector's boxes; ``loss="auto"``: per output, KL on a Softmax's logits,
binary KL on a Sigmoid's probabilities such as a detector's class scores, standardised MSE on the
rest), AdamW with a cosine schedule, ``val_fraction`` of the inputs held back to pick the best
epoch. Only weights move (Conv/Gemm/MatMul weights and biases, BatchNorm scale and shift);
BatchNorm statistics, the graph and every name stay as they are, so quantization and the rest of
the pipeline see the same structure.

After ``quantize-int8`` it is quantization-aware training: the student's rounding steps are
simulated in float with a straight-through gradient and its int8 weights are trained on their grid
(same scales, new integers; :mod:`onnxforge.distill.fake_quant`), so ``quantize-int8,distill``
recovers accuracy the rounding lost without changing the quantized graph. Its default ``lr`` is then
1e-5 instead of 1e-4 (Adam moves each weight by about ``lr`` per step, and an int8 weight's grid step
is often ~1e-3).

Needs ``context.reference_model`` (the pipeline sets it: the model before the first lossy pass) and
``context.calibration_data`` (hundreds to thousands of inputs; ``max_samples`` caps how many are used).
Deterministic for a given ``seed`` and thread count (torch on CPU). Lossy, no a-priori bound:
the pipeline's verifier reports the fidelity.
"""

from __future__ import annotations

import itertools
import logging
import math

import onnx_ir as ir

from onnxforge.distill.graph_kd import LOSSES
from onnxforge.errors import CalibrationDataError, PassOptionError
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.registry import register_pass

logger = logging.getLogger(__name__)


FLOAT_LR = 1e-4  # the default lr of a float student
QAT_LR = 1e-5    # ... and of a quantized one


@register_pass("distill")
class DistillPass(Pass):
    """Knowledge-distillation fine-tuning of the weights to the teacher (unlabeled data). Lossy."""

    lossless = False
    tolerance = math.inf

    def __init__(self, epochs: int = 3, lr: float | None = None, temperature: float = 2.0, batch_size: int = 32,
                 max_samples: int = 1024, val_fraction: float = 0.1, patience: int = 3, threads: int = 1,
                 loss: str = "kl"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if epochs < 1 or batch_size < 1 or max_samples < 2 or patience < 1:
            raise ValueError("epochs, batch_size and patience must be >= 1, max_samples >= 2")
        if (lr is not None and not lr > 0) or not temperature > 0:
            raise ValueError(f"lr and temperature must be > 0, got {lr}, {temperature}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {threads}")
        self.epochs = epochs
        self.lr = lr
        self.temperature = temperature
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.val_fraction = val_fraction
        self.patience = patience
        self.threads = threads
        self.loss = loss

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxforge.distill.graph_kd import distill_graph
        from onnxforge.distill.train import KDConfig

        teacher = self.context.reference_model
        data = self.context.calibration_data
        if teacher is None:
            raise PassOptionError("distill needs the teacher: PassContext.reference_model (the model before pruning)")
        if data is None:
            raise CalibrationDataError("distill needs calibration data (PassContext.calibration_data): "
                                       "hundreds of unlabeled inputs")
        feeds = list(itertools.islice(data, self.max_samples))
        quantized = any(n.op_type == "QuantizeLinear" for n in model.graph)
        # Adam moves every weight by about lr a step: 1e-4 re-rounds most int8 weights at once
        # (EfficientNet-Lite0's loss rose 30x); 1e-5 moves them a grid step in tens of steps
        lr = self.lr if self.lr is not None else (QAT_LR if quantized else FLOAT_LR)
        config = KDConfig(epochs=self.epochs, lr=lr, temperature=self.temperature, batch_size=self.batch_size,
                          val_fraction=self.val_fraction, patience=self.patience, seed=self.context.seed,
                          threads=self.threads or None, loss=self.loss)
        result = distill_graph(teacher, model, feeds, config)
        trained = result.model.graph.initializers
        changed = 0
        for name, value in model.graph.initializers.items():
            new = trained.get(name)
            if new is not None and new.const_value is not None and new.const_value is not value.const_value:
                value.const_value = new.const_value
                changed += 1
        history = result.train.history
        stats.count("samples", len(feeds))
        stats.count("tensors_trained", changed)
        stats.details.update(
            targets=result.targets, best_epoch=result.train.best_epoch, epochs_run=len(history),
            quantization_aware=quantized, lr=lr,
            runner_check_rel_error=result.check_error,
            val_agreement=[h.val_agreement for h in history], val_loss=[h.val_loss for h in history],
            train_loss=[h.train_loss for h in history],
        )
        stats.details["loss_kinds"] = dict(zip(result.targets, result.loss_kinds))
        if history and self.loss == "kl" and not math.isnan(history[-1].val_agreement):
            best = history[result.train.best_epoch - 1]
            stats.note(f"best epoch {result.train.best_epoch}: top-1 agreement with the teacher on the "
                       f"{result.train.n_val} held-back inputs {best.val_agreement:.3f}")
        return changed > 0
