"""Knowledge-distillation fine-tuning of a student torch module against its teacher.

Loss per batch (Hinton et al. 2015, FitNets-style feature term optional)::

    L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T))          soft targets, last axis
                                                                    (``loss="mse"``: mean((s - t)^2);
                                                                    ``"bce"``: binary KL, see below)
      + (1 - alpha) * CE(s, y)                                      only when labels are given
      + beta * sum_l MSE(A_l(f_s,l), f_t,l)                         feature matching (``features``)

``s``/``t`` are the student's/teacher's outputs (every float output, softmax over the last axis),
``T`` the temperature (the ``T^2`` keeps the gradient scale independent of ``T``). For outputs that
are independent probabilities (a ``Sigmoid``'s: a detector's class scores) ``"bce"`` is the binary
KL ``t log(t/s) + (1-t) log((1-t)/(1-s))``, summed over the last axis and averaged over the rest: its
gradient on the student's logit is ``s - t``, so an error near a decision threshold costs what it
costs there, and a score of 1e-4 against 1e-3 costs almost nothing (a per-channel standardised MSE
weighs that like a flipped box). ``loss`` may also be a sequence: one kind per output. ``f_{s,l}`` and
``f_{t,l}`` are the outputs of the named submodule ``l`` in both networks; when the student's layer is
narrower (pruned), ``A_l`` is a learned 1x1 projection to the teacher's width (trained with the student,
then discarded), else the identity.

A fraction ``val_fraction`` of the data is held back (a fixed permutation from ``seed``); after every
epoch the distillation loss on it decides early stopping (``patience`` epochs without improvement) and
the student returned is the best epoch's. Lossy by nature: it is training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LOSS_KINDS", "EpochStats", "KDConfig", "TrainResult", "train_kd"]

LOSS_KINDS = ("kl", "mse", "bce")


@dataclass(frozen=True)
class KDConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-4
    temperature: float = 2.0
    alpha: float = 0.7
    features: Sequence[str] = ()
    feature_weight: float = 1.0
    val_fraction: float = 0.1
    patience: int = 5
    seed: int = 0
    threads: int | None = None
    # "kl": soft targets over the last axis (logits); "mse": outputs that are not logits; "bce":
    # probabilities of independent events (Sigmoid outputs); or one of those per output
    loss: str | Sequence[str] = "kl"

    def __post_init__(self):
        # "auto" (one kind per output, by what the output is) is resolved by graph_kd, which sees the graph
        kinds = (self.loss,) if isinstance(self.loss, str) else tuple(self.loss)
        if self.loss != "auto" and (not kinds or any(k not in LOSS_KINDS for k in kinds)):
            raise ValueError(f"loss must be one of {', '.join(LOSS_KINDS)} (or one per output), got {self.loss!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_size < 1 or self.patience < 1:
            raise ValueError("batch_size and patience must be >= 1")


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float | None  # against labels, when given
    val_agreement: float        # top-1 agreement with the teacher on the held-back data


@dataclass
class TrainResult:
    module: Any
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    n_train: int = 0
    n_val: int = 0


def _outputs(y, torch) -> list:
    return [y] if isinstance(y, torch.Tensor) else [t for t in y if isinstance(t, torch.Tensor)]


def _kd_term(s, t, temperature: float, torch) -> Any:
    F = torch.nn.functional
    if not s.is_floating_point():
        return s.new_zeros(())
    log_p = F.log_softmax(s / temperature, dim=-1)
    q = F.softmax(t / temperature, dim=-1)
    return F.kl_div(log_p.reshape(-1, s.shape[-1]), q.reshape(-1, t.shape[-1]), reduction="batchmean") * temperature**2


def _binary_kl(s, t, torch) -> Any:
    """Binary KL of probabilities ``t`` (teacher) to ``s``, summed over the last axis, mean over the rest."""
    if not s.is_floating_point():
        return s.new_zeros(())
    eps = 1e-6
    s, t = s.clamp(eps, 1 - eps), t.clamp(eps, 1 - eps)
    kl = t * (t.log() - s.log()) + (1 - t) * ((1 - t).log() - (1 - s).log())
    return kl.sum(-1).mean() if kl.dim() else kl


def _term(kind: str, s, t, temperature: float, torch) -> Any:
    if kind == "mse":
        return torch.nn.functional.mse_loss(s, t) if s.is_floating_point() else s.new_zeros(())
    if kind == "bce":
        return _binary_kl(s, t, torch)
    return _kd_term(s, t, temperature, torch)


class _Hooks:
    """Records the outputs of named submodules during forward."""

    def __init__(self, module, names: Sequence[str]):
        self.values: dict[str, Any] = {}
        self.handles = []
        for name in names:
            sub = module.get_submodule(name)
            self.handles.append(sub.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self.values[name] = output
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _adapter(s_feat, t_feat, torch):
    """Identity when shapes match, else a 1x1 projection over the channel axis (axis 1)."""
    if s_feat.shape == t_feat.shape:
        return torch.nn.Identity()
    if s_feat.dim() < 2 or s_feat.shape[2:] != t_feat.shape[2:]:
        raise ValueError(f"feature shapes {tuple(s_feat.shape)} and {tuple(t_feat.shape)} differ beyond the channel axis")
    c_s, c_t = s_feat.shape[1], t_feat.shape[1]
    if s_feat.dim() == 2:
        return torch.nn.Linear(c_s, c_t, bias=False)
    conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[s_feat.dim()]
    return conv(c_s, c_t, 1, bias=False)


def train_kd(student, teacher, inputs: Sequence[np.ndarray], labels: np.ndarray | None, config: KDConfig,
             progress: Callable[[int, int, str], None] | None = None) -> TrainResult:
    """Fine-tune ``student`` (in place, best epoch restored) against ``teacher`` on ``inputs``.

    ``inputs`` are the positional arguments of ``forward``, each with the sample axis first;
    ``labels`` (int class ids, sample axis first) are optional. ``progress(done, total, text)`` is
    called after every batch.
    """
    from onnxforge.torch_export import import_torch

    torch = import_torch()
    F = torch.nn.functional
    n = len(inputs[0])
    if any(len(a) != n for a in inputs) or (labels is not None and len(labels) != n):
        raise ValueError("distill data: arrays disagree on the number of samples")
    gen = np.random.default_rng(config.seed)
    order = gen.permutation(n)
    n_val = int(round(n * config.val_fraction)) if config.val_fraction > 0 else 0
    if config.val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    val_idx, train_idx = order[:n_val], order[n_val:]
    if len(train_idx) == 0:
        raise ValueError("distill data: nothing left to train on after holding back validation samples")
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    y = torch.from_numpy(np.asarray(labels).astype(np.int64)) if labels is not None else None

    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    was_training = teacher.training
    teacher.eval()  # its forward runs under no_grad; its parameters are left as they are
    s_hooks = _Hooks(student, config.features)
    t_hooks = _Hooks(teacher, config.features)
    adapters = torch.nn.ModuleDict()
    try:
        if config.features:  # build the adapters from one forward pass
            probe = [t[train_idx[:2]] for t in tensors]
            with torch.no_grad():
                student.eval()(*probe)
                teacher(*probe)
            for name in config.features:
                adapters[name.replace(".", "_")] = _adapter(s_hooks.values[name], t_hooks.values[name], torch)
        params = list(student.parameters()) + list(adapters.parameters())
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(train_idx) / config.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
        total = config.epochs * steps_per_epoch

        def loss_on(idx, train: bool):
            batch = [t[idx] for t in tensors]
            with torch.no_grad():
                t_out = _outputs(teacher(*batch), torch)
            s_out = _outputs(student(*batch), torch)
            kinds = [config.loss] * len(s_out) if isinstance(config.loss, str) else list(config.loss)
            if "auto" in kinds or len(kinds) != len(s_out):
                raise ValueError(f"loss {config.loss!r}: train_kd needs one of {LOSS_KINDS} per output "
                                 f"({len(s_out)}); 'auto' is for distill_graph")
            loss = sum(_term(k, s, t, config.temperature, torch) for k, s, t in zip(kinds, s_out, t_out))
            loss = config.alpha * loss if y is not None else loss
            if y is not None and config.alpha < 1.0:
                loss = loss + (1.0 - config.alpha) * F.cross_entropy(s_out[0].reshape(len(idx), -1), y[idx])
            for name in config.features:
                s_f = adapters[name.replace(".", "_")](s_hooks.values[name])
                loss = loss + config.feature_weight * F.mse_loss(s_f, t_hooks.values[name])
            return loss, s_out[0], t_out[0]

        result = TrainResult(module=student, n_train=len(train_idx), n_val=n_val)
        best, best_state, stale, done = math.inf, copy.deepcopy(student.state_dict()), 0, 0
        for epoch in range(1, config.epochs + 1):
            student.train()
            perm = train_idx[gen.permutation(len(train_idx))]
            running, count = 0.0, 0
            for lo in range(0, len(perm), config.batch_size):
                idx = perm[lo : lo + config.batch_size]
                loss, _, _ = loss_on(idx, True)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                running += float(loss.detach()) * len(idx)
                count += len(idx)
                done += 1
                if progress is not None:
                    progress(done, total, f"epoch {epoch}/{config.epochs} loss {running / count:.4f}")
            student.eval()
            stats = EpochStats(epoch, running / count, math.nan, None, math.nan)
            if n_val:
                with torch.no_grad():  # in batches: the whole held-back set at once can exhaust memory
                    parts = [loss_on(val_idx[lo : lo + config.batch_size], False)
                             for lo in range(0, n_val, config.batch_size)]
                    sizes = [len(val_idx[lo : lo + config.batch_size]) for lo in range(0, n_val, config.batch_size)]
                    v_loss = sum(float(p[0]) * k for p, k in zip(parts, sizes)) / n_val
                    s_logits = torch.cat([p[1].reshape(k, -1) for p, k in zip(parts, sizes)])
                    t_logits = torch.cat([p[2].reshape(k, -1) for p, k in zip(parts, sizes)])
                s_top = s_logits.reshape(n_val, -1).argmax(1)
                stats.val_loss = float(v_loss)
                stats.val_agreement = float((s_top == t_logits.reshape(n_val, -1).argmax(1)).float().mean())
                if y is not None:
                    stats.val_accuracy = float((s_top == y[val_idx]).float().mean())
            result.history.append(stats)
            metric = stats.val_loss if n_val else stats.train_loss
            if metric < best - 1e-6:
                best, best_state, stale, result.best_epoch = metric, copy.deepcopy(student.state_dict()), 0, epoch
            else:
                stale += 1
                if stale >= config.patience and epoch < config.epochs:
                    result.stopped_early = True
                    break
        student.load_state_dict(best_state)
        student.eval()
        return result
    finally:
        s_hooks.close()
        t_hooks.close()
        teacher.train(was_training)
        torch.set_num_threads(previous_threads)
