"""``reconstruct``: gradient-free, layer-wise re-fit of a pruned (or otherwise changed) model to its
unpruned teacher on calibration data.

For every Conv / Gemm / MatMul of the student whose weight differs from the teacher's layer of the
same node name (in topological order), with ``X`` the student's input to that layer *as it is now*
(earlier layers already re-fitted), ``A = [X 1]``, restricted to the output channels the student
kept, the layer's new weights and bias solve

    [W; b] = argmin || act(s * (A [W; b]) + o) - act(Z) ||^2 + lambda ||W||^2,
    lambda = ridge * tr(X^T X) / d

where ``Z`` is the teacher's value at the *end of the layer's tail*: the layer's output followed
through single-consumer BatchNorm (``z = g y + h``, per channel) and ``Add`` nodes (a residual
``r``, the student's own, or a constant) up to a ``Relu`` / ``Clip``, which gives ``act``;
``s`` and ``o`` collect the BatchNorm scale and the shifts (``o`` includes the student's residual,
so the layer also absorbs the other branch's error). With no activation this is one ridge solve,
``(A^T A + lambda I') [W; b] = A^T (Z - o) / s`` (the bias column is not regularized). With one,
rows where the teacher is clamped (``Z <= lo`` for a ReLU) cost nothing as long as the student is
clamped there too: solved by majorize-minimize, each step the same ridge system with those rows'
targets set to the current prediction pulled back to the bound (never increases the objective;
at most ``iterations`` steps). ``target="output"`` fits the layer's own output instead (no tail).

Why the tail matters: a ReLU discards negative pre-activations, so a plain fit spends its
capacity matching values nobody reads. It also makes the fit independent of whether BatchNorm was
folded into the Conv first (per-channel ridge least squares is equivariant to a per-channel affine
map of the target; ``lambda`` depends on ``X`` only), so a teacher taken after ``O1`` gives the
same fit for the same kept channels. (Which channels are kept may differ: ``criterion=l1`` scores
folded filters ``W * gamma / sigma``.)

For a Conv, ``X`` is the im2col matrix of the input (rows = output positions, columns = kept input
channels x kernel), so the fit is exact least squares over the kept input channels: the removed
channels' contribution is redistributed over the kept ones, and the bias absorbs the mean shift
(bias correction). A grouped Conv is fitted per group (group ``j``'s output channels from group
``j``'s input channels only; a depthwise Conv: each channel from its own input channel, a
``k*k + 1`` least squares), and there the ridge pulls the taps towards their current values
(``+ lambda ||W - W_now||^2``) rather than towards 0: with so few inputs per channel, shrinking
to 0 cost more than the fit gained on mobilenetv2_style. Gemm (``alpha = beta = 1``) fits ``B``
and ``C``. MatMul fits ``B`` and a bias: folded into the constant of the ``Add`` that already
follows it (an exported Linear on 3-D input) when that constant is per output column and not
shared, else a new ``Add`` with a new initializer (its output keeps the MatMul output's name);
not when the output goes into ``QuantizeLinear`` (the MatMul -> Q pattern must stay), which is
reported in the layer's ``bias`` field and in the notes. Rows are subsampled to ``max_rows``.

A layer's new weights are kept only if its error on the calibration rows went down. A weight or
bias the layer shares with another reader (another node, a graph output) is copied first and the
layer re-pointed to its own copy (count ``shared_weights_copied``): re-fitting it in place would
change the other reader's layer under it. The relative
error ``||act(z_student) - act(Z)|| / ||act(Z)||`` of each layer before and after is reported in
``stats.details["layers"]`` (with the value fitted, ``target``, and the ``activation``).

Pairing student and teacher channels: ``prune-channels`` records, on each pruned node, which of
the original output channels it kept (``node.meta["onnxforge.prune.kept_out"]``, in memory only).
When that record is absent (the model was saved and reloaded in between) each student channel is
paired with the teacher channel its current output correlates with most (one-to-one, greedy).

Cost: the teacher runs once; the student's inputs are computed incrementally (:class:`~onnxforge.runtime.student.StudentValues`:
only the nodes between cached values and the next layer's input run, and a re-fit drops what lies
downstream of it), each block's system matrix is inverted once for all majorize-minimize steps,
and numpy's BLAS runs single-threaded (small products; oversubscribed threads spin). On
mobilenetv2_style (ratio 0.5, 64 random feeds, 2 busy cores) this took the pass from 38 s to 11 s
with the same weights (max abs difference 5e-5 on a weight of magnitude 3.8, layer errors within 1e-9).

Lossy (it changes weights to match a teacher, not to preserve the student's outputs); no bound.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.errors import CalibrationDataError, PassOptionError
from onnxforge.ir.graph import const_value, is_shared, make_initializer, unique_name
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.prune.shrink import KEPT_META, set_constant
from onnxforge.passes.registry import register_pass
from onnxforge.runtime.student import StudentValues

logger = logging.getLogger(__name__)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def im2col(x: np.ndarray, node: ir.Node, kernel: tuple[int, int]) -> np.ndarray:
    """Rows = output positions (n, ho, wo), columns = (c, kh, kw) -- matching ``W.reshape(O, -1)``."""
    kh, kw = kernel
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    sh, sw = _attr(node, "strides", [1, 1])
    dh, dw = _attr(node, "dilations", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


@dataclass
class Tail:
    """What the network does with a layer's output ``y`` before anything else reads it.

    ``z = scale * y + offset`` (a following BatchNorm and constant or residual ``Add``s, applied
    in order), then ``clamp(z, lo, hi)`` when an activation of that form follows (``Relu``: lo = 0;
    ``Clip``). ``end`` names ``z``; the teacher has a value of the same name.
    """

    end: str
    steps: list[tuple[str, Any]] = field(default_factory=list)
    lo: float = -math.inf
    hi: float = math.inf
    activation: str = ""

    def residual_names(self) -> list[str]:
        return [arg for kind, arg in self.steps if kind == "add" and isinstance(arg, str)]


def find_tail(node: ir.Node) -> Tail:
    """Follow ``node``'s output through single-consumer BatchNorm / Add nodes to a Relu or Clip."""
    v = node.outputs[0]
    tail = Tail(end=v.name)
    channel_first = node.op_type == "Conv"
    while not v.is_graph_output():
        users = list(v.consumers())
        if len(users) != 1:
            break
        c = users[0]
        if c.op_type == "BatchNormalization" and c.inputs[0] is v and (channel_first or _rank(v) == 2):
            params = [const_value(c.inputs[i]) if len(c.inputs) > i else None for i in range(1, 5)]
            if any(p is None for p in params) or int(_attr(c, "training_mode", 0)) or any(
                    o.consumers() for o in c.outputs[1:]):
                break
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            g = gamma / np.sqrt(var + float(_attr(c, "epsilon", 1e-5)))
            tail.steps.append(("bn", (g, beta - mean * g)))
        elif c.op_type == "Add" and len(c.inputs) == 2 and c.inputs[0] is not c.inputs[1]:
            other = c.inputs[1] if c.inputs[0] is v else c.inputs[0]
            k = const_value(other)
            tail.steps.append(("add", k.astype(np.float64) if k is not None else other.name))
        elif c.op_type == "Relu":
            tail.lo, tail.activation = 0.0, "Relu"
            break
        elif c.op_type == "Clip":
            lo, hi = _clip_bounds(c)
            if lo is None:
                break
            tail.lo, tail.hi, tail.activation = lo, hi, "Clip"
            break
        else:
            break
        v = c.outputs[0]
        tail.end = v.name
    return tail


def _rank(v: ir.Value) -> int | None:
    return None if v.shape is None else len(v.shape)


def _clip_bounds(node: ir.Node) -> tuple[float | None, float]:
    if len(node.inputs) > 1 or "min" not in node.attributes:  # opset >= 11: min / max are inputs
        bounds = []
        for i in (1, 2):
            val = node.inputs[i] if len(node.inputs) > i else None
            arr = const_value(val) if val is not None else None
            if val is not None and arr is None:
                return None, math.inf
            bounds.append(None if arr is None else float(arr))
        lo, hi = bounds
    else:
        lo, hi = _attr(node, "min", None), _attr(node, "max", None)
    return (-math.inf if lo is None else lo), (math.inf if hi is None else hi)


@register_pass("reconstruct")
class ReconstructPass(Pass):
    """Re-fit each changed Conv/Gemm/MatMul by ridge least squares to the teacher. Lossy.

    Needs ``context.reference_model`` (the teacher) and ``context.calibration_data``. See the module
    docstring for the math; ``target="activation"`` (default) fits what the next layer sees (after
    BatchNorm, residual Add and ReLU/Clip), ``target="output"`` the layer's own output.
    """

    lossless = False
    tolerance = math.inf

    def __init__(self, ridge: float = 1e-3, max_rows: int = 20000, layers: str = "changed",
                 target: str = "activation", iterations: int = 30):
        super().__init__()
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if layers not in ("changed", "all"):
            raise ValueError(f"layers must be 'changed' or 'all', got {layers!r}")
        if target not in ("activation", "output"):
            raise ValueError(f"target must be 'activation' or 'output', got {target!r}")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        self.ridge = ridge
        self.max_rows = max_rows
        self.layers = layers
        self.target = target
        self.iterations = iterations

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        from onnxforge.runtime.activations import collect

        teacher = self.context.reference_model
        data = self.context.calibration_data
        if teacher is None:
            raise PassOptionError("reconstruct needs the teacher: PassContext.reference_model (the unpruned model)")
        if data is None:
            raise CalibrationDataError("reconstruct needs calibration data (PassContext.calibration_data)")
        max_samples = (self.context.options or {}).get("num_samples", 64)
        t_nodes = {n.name: n for n in teacher.graph if n.name}
        t_values = {v.name for n in teacher.graph for v in n.outputs}
        layers = []
        for node in model.graph:
            if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
                continue
            w = const_value(node.inputs[1])
            t = t_nodes.get(node.name)
            if w is None or t is None or w.dtype != np.float32:
                if w is not None and t is None and node.name:
                    stats.skip(node, "no teacher layer of the same name")
                continue
            tw = const_value(t.inputs[1]) if len(t.inputs) > 1 else None
            if self.layers == "changed" and tw is not None and tw.shape == w.shape and np.array_equal(tw, w):
                continue
            reason = self._unsupported(node, w, tw)
            if reason:
                stats.skip(node, reason)
                continue
            tail = find_tail(node) if self.target == "activation" else Tail(end=node.outputs[0].name)
            if tail.end not in t_values:
                stats.note(f"{node.name}: teacher has no value {tail.end!r}; fitting the layer's own output")
                tail = Tail(end=node.outputs[0].name)
            layers.append((node, t, tail))
        if not layers:
            stats.note("no changed layer to re-fit")
            return False
        teacher_out = collect(teacher, data, [tail.end for _, _, tail in layers], max_samples=max_samples)
        rng = np.random.default_rng(self.context.seed)
        with _single_threaded_blas():
            report, changed = self._refit_all(model, data, layers, teacher_out, max_samples, rng, stats)
        stats.details["layers"] = report
        return changed

    def _refit_all(self, model, data, layers, teacher_out, max_samples, rng, stats):
        report = []
        changed = False
        student = StudentValues(model, data, max_samples)
        for i, (node, t, tail) in enumerate(layers):
            if tail.end not in teacher_out:
                stats.skip(node, f"teacher value {tail.end!r} could not be collected")
                continue
            x_name = node.inputs[0].name
            wanted = [x_name, *tail.residual_names()]
            xs = student.get(wanted)
            # Later layers' inputs (and this one's, as a starting point) stay cached; the rest goes.
            student.keep({n for later, _, tl in layers[i + 1:] for n in (later.inputs[0].name, *tl.residual_names())}
                         | set(wanted))
            missing = [n for n in wanted if n not in xs]
            if missing:
                stats.skip(node, f"student value(s) {missing} could not be collected")
                continue
            residuals = {n: np.concatenate(xs[n]) for n in wanted[1:]}
            row = self._refit(node, np.concatenate(xs[x_name]), np.concatenate(teacher_out[tail.end]), tail,
                              residuals, rng, stats)
            if row is not None:
                report.append(row)
                if row["accepted"]:
                    changed = True
                    stats.count("layers_refit")
                    student.invalidate(node)
        stats.details["student_runs"] = student.runs
        return report, changed

    def _unsupported(self, node: ir.Node, w: np.ndarray, tw: np.ndarray | None) -> str:
        if tw is None:
            return "teacher weight is not a constant"
        if node.op_type == "Conv":
            if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or w.ndim != 4:
                return "only 2-D Conv with explicit pads is re-fitted"
        if node.op_type == "Gemm" and (int(_attr(node, "transA", 0)) or _attr(node, "alpha", 1.0) != 1.0
                                       or _attr(node, "beta", 1.0) != 1.0):
            return "Gemm with transA or alpha/beta != 1 is not re-fitted"
        if node.op_type == "MatMul" and w.ndim != 2:
            return "MatMul weight is not 2-D"
        n_out = w.shape[0] if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)) else w.shape[1]
        t_out = tw.shape[0] if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)) else tw.shape[1]
        if n_out > t_out:
            return "more output channels than the teacher"
        return ""

    def _refit(self, node: ir.Node, x: np.ndarray, z_teacher: np.ndarray, tail: Tail,
               residuals: dict[str, np.ndarray], rng, stats: PassStats) -> dict | None:
        w_val = node.inputs[1]
        w = const_value(w_val).astype(np.float64)
        b_val = node.inputs[2] if len(node.inputs) > 2 else None
        bias = const_value(b_val) if b_val is not None else None
        if b_val is not None and bias is None:
            stats.skip(node, "bias is not a constant")
            return None
        kept = node.meta.get(KEPT_META)
        op = node.op_type
        trans_b = op == "Gemm" and int(_attr(node, "transB", 0))
        # Blocks of independent fits: (output columns, weight rows as a design matrix, function
        # building that design's rows). One block, except for a grouped Conv: group j's outputs
        # read only group j's inputs (a depthwise Conv: one channel, k x k taps plus bias each).
        if op == "Conv":
            o, ci, kh, kw = w.shape
            groups = int(_attr(node, "group", 1))
            if o % groups or x.shape[1] != ci * groups:
                stats.skip(node, f"input has {x.shape[1]} channels, weight {w.shape} with group={groups}")
                return None
            og = o // groups
            blocks = [(slice(j * og, (j + 1) * og), w[j * og:(j + 1) * og].reshape(og, -1).T,
                       lambda j=j: im2col(x[:, j * ci:(j + 1) * ci].astype(np.float64), node, (kh, kw)))
                      for j in range(groups)]
            n_rows = im2col(x[:1, :1], node, (kh, kw)).shape[0] * x.shape[0]
        else:
            w_mat = w.T if trans_b else w
            a_all = x.reshape(-1, x.shape[-1]).astype(np.float64)
            blocks = [(slice(0, w_mat.shape[1]), w_mat, lambda: a_all)]
            n_rows = a_all.shape[0]
        n_out = sum(cols.stop - cols.start for cols, _, _ in blocks)
        fit_bias, bias_note = True, ""
        if op == "Gemm" and bias is not None and bias.size not in (1, n_out):
            stats.skip(node, f"Gemm bias of shape {bias.shape} is not per output channel")
            return None
        if op == "MatMul":
            bias_note = _matmul_bias_unsafe(node)
            fit_bias = not bias_note
            if bias_note:
                stats.note(f"{node.name}: {bias_note}")
        b_old = np.zeros(n_out) if bias is None else np.broadcast_to(bias, (n_out,)).astype(np.float64)
        # z_teacher has the layer's output layout; only its channel count is the teacher's.
        ch = 1 if op == "Conv" else z_teacher.ndim - 1
        out_shape = z_teacher.shape[:ch] + (n_out,) + z_teacher.shape[ch + 1:]
        try:
            scale, offset = _affine(tail, out_shape, ch, residuals)
        except ValueError as e:
            stats.skip(node, f"cannot follow the output to {tail.end!r}: {e}")
            return None
        z_t = _rows(z_teacher, ch)
        if n_rows != z_t.shape[0] or offset.shape[0] != z_t.shape[0]:
            stats.skip(node, f"activation shapes do not line up ({n_rows} rows, {z_t.shape}, weight {w.shape})")
            return None
        idx = None
        if n_rows > self.max_rows:
            idx = np.sort(rng.choice(n_rows, self.max_rows, replace=False))
            z_t, offset = z_t[idx], offset[idx]
        # Keep the design matrices when they are small; a wide depthwise layer rebuilds them instead.
        cache = sum(wb.shape[0] for _, wb, _ in blocks) * min(n_rows, self.max_rows) <= 5e7
        designs: list[np.ndarray | None] = []
        pred_old = np.empty((z_t.shape[0], n_out))
        for cols, w_b, make in blocks:
            a = make()
            a = a if idx is None else a[idx]
            if a.shape[1] != w_b.shape[0]:
                stats.skip(node, f"activation shapes do not line up ({a.shape}, weight {w_b.shape})")
                return None
            pred_old[:, cols] = a @ w_b + b_old[cols]
            designs.append(a if cache else None)
        if kept is None and z_t.shape[1] != n_out:
            kept = _match_channels(scale * pred_old + offset, z_t)
            stats.note(f"{node.name}: output channels paired with the teacher's by correlation (no pruning record)")
        if kept is not None:
            z_t = z_t[:, np.asarray(kept)]
        if z_t.shape[1] != n_out:
            stats.skip(node, f"teacher has {z_t.shape[1]} output channels for the student's {n_out}")
            return None
        z_t = z_t.astype(np.float64)
        lo, hi = tail.lo, tail.hi
        clamp = (lambda z: np.clip(z, lo, hi)) if tail.activation else (lambda z: z)
        z_t_act = clamp(z_t)
        before = _rel_err(clamp(scale * pred_old + offset), z_t_act)

        w_new = np.empty((blocks[0][1].shape[0], n_out)) if len(blocks) == 1 else None
        conv_w = np.empty_like(w) if op == "Conv" else None
        b_new = np.empty(n_out)
        pred_new = np.empty_like(pred_old)
        try:
            for (cols, w_b, make), a in zip(blocks, designs):
                if a is None:
                    a = make()
                    a = a if idx is None else a[idx]
                # A grouped / depthwise block is shrunk towards its current taps, not towards 0:
                # with k x k inputs per channel, shrinking to 0 costs more than the fit gains
                # when the channel's input is already (nearly) the teacher's.
                prior = w_b if len(blocks) > 1 else None
                sol = self._fit(a, z_t[:, cols], scale[cols], offset[:, cols], pred_old[:, cols],
                                fit_bias, tail, clamp, prior)
                design = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1) if fit_bias else a
                pred_new[:, cols] = design @ sol
                w_b_new = sol[:-1] if fit_bias else sol
                b_new[cols] = sol[-1] if fit_bias else 0.0
                if conv_w is not None:
                    conv_w[cols] = w_b_new.T.reshape((cols.stop - cols.start,) + w.shape[1:])
                else:
                    w_new = w_b_new
        except np.linalg.LinAlgError:
            stats.skip(node, "least-squares system is singular")
            return None
        after = _rel_err(clamp(scale * pred_new + offset), z_t_act)
        accepted = after < before
        if accepted:
            w_store = conv_w if conv_w is not None else (w_new.T if trans_b else w_new)
            # A weight (or bias) read by another node too gets a private copy: re-fitting it in
            # place would change the other reader's layer under it.
            w_val = _private_input(node, 1, stats)
            if b_val is not None:
                b_val = _private_input(node, 2, stats)
            set_constant(w_val, w_store.astype(np.float32))
            if fit_bias:
                self._store_bias(node, w_val, b_val, bias, b_new, stats)
        row = {"layer": node.name, "op": op, "rows": int(z_t.shape[0]), "target": tail.end,
               "activation": tail.activation, "error_before": before,
               "error_after": after if accepted else before, "accepted": bool(accepted)}
        if op == "Conv" and len(blocks) > 1:
            row["groups"] = len(blocks)
        if bias_note:
            row["bias"] = bias_note
        return row

    def _fit(self, a: np.ndarray, z_t: np.ndarray, scale: np.ndarray, offset: np.ndarray,
             pred_old: np.ndarray, fit_bias: bool, tail: Tail, clamp,
             prior: np.ndarray | None = None) -> np.ndarray:
        """Ridge (+ majorize-minimize through the clamp) solution ``[W; b]`` for one block; the
        ridge pulls ``W`` towards ``prior`` (0 when None)."""
        design = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1) if fit_bias else a
        gram = design.T @ design
        d = a.shape[1]
        lam = self.ridge * float(np.trace(gram[:d, :d])) / max(d, 1)
        reg = np.full(design.shape[1], lam)
        if fit_bias:
            reg[-1] = 0.0
        lhs = gram + np.diag(reg)
        pull = 0.0
        if prior is not None:
            pull = np.zeros((design.shape[1], prior.shape[1]))
            pull[:d] = lam * prior
        # Channels whose z does not depend on y (BatchNorm scale 0) keep their current output.
        live = np.abs(scale) > 1e-12
        safe = np.where(live, scale, 1.0)

        # The system matrix is the same for every solve: invert it once (the majorize-minimize
        # loop below solves it up to ``iterations + 1`` times per block).
        try:
            inv = np.linalg.inv(lhs)
        except np.linalg.LinAlgError:
            # e.g. a depthwise channel whose input is all zero (dead after ReLU, or pruned
            # upstream): the minimum-norm solution (lstsq's) leaves its taps at 0 and fits the bias.
            inv = np.linalg.pinv(lhs)

        def solve(z_eff):
            y_eff = np.where(live, (z_eff - offset) / safe, pred_old)
            return inv @ (design.T @ y_eff + pull)

        sol = solve(z_t)
        lo, hi = tail.lo, tail.hi
        if tail.activation and self.iterations:
            # min sum (clamp(z) - clamp(z_t))^2 by majorize-minimize: where the teacher is clamped
            # (z_t <= lo or >= hi) any z on the same side is as good as z_t, so that row's target
            # is the current prediction pulled back to the bound; each step is one ridge solve with
            # the same matrix and the objective never increases.
            z_t_act = clamp(z_t)
            below, above = z_t <= lo, z_t >= hi
            prev = math.inf
            for _ in range(self.iterations):
                z_p = scale * (design @ sol) + offset
                loss = float(np.sum((clamp(z_p) - z_t_act) ** 2))
                if loss > prev * (1 - 1e-4):
                    break
                prev = loss
                z_eff = np.where(below, np.minimum(z_p, lo), np.where(above, np.maximum(z_p, hi), z_t))
                sol = solve(z_eff)
        return sol

    @staticmethod
    def _store_bias(node: ir.Node, w_val: ir.Value, b_val: ir.Value | None, bias: np.ndarray | None,
                    b_new: np.ndarray, stats: PassStats) -> None:
        b_new = b_new.astype(np.float32)
        if b_val is not None:
            set_constant(b_val, b_new.reshape(bias.shape if bias.size == b_new.size else b_new.shape))
        elif node.op_type != "MatMul":
            node.resize_inputs(3)
            node.replace_input_with(2, make_initializer(node.graph, f"{w_val.name}_bias", b_new))
        else:
            _add_matmul_bias(node, w_val, b_new, stats)


def _single_threaded_blas():
    """Limit numpy's BLAS to one thread (when threadpoolctl is installed).

    The products here are small (design matrices of at most ``max_rows`` x a few hundred columns,
    one per layer or per depthwise channel, each used once per majorize-minimize step) and
    onnxruntime's own thread pool runs in between; with the cores oversubscribed, OpenBLAS's
    threads spin against each other: measured on mobilenetv2_style (ratio 0.5, 64 feeds, 2 busy
    cores) a 17 x 4096 by 4096 x 96 product took 270 ms with 2 BLAS threads and 1.7 ms with one,
    and the whole pass 52 s vs 18.5 s.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _private_input(node: ir.Node, index: int, stats: PassStats) -> ir.Value:
    """``node.inputs[index]``, replaced first by a copy of its own when something else reads it too
    (another node, a graph output) or it is a graph input."""
    value = node.inputs[index]
    if not (is_shared(value) or value.is_graph_input()):
        return value
    copy = make_initializer(node.graph, f"{value.name}_{node.name or node.op_type}",
                            np.array(const_value(value), copy=True))
    node.replace_input_with(index, copy)
    stats.count("shared_weights_copied")
    return copy


def _rows(arr: np.ndarray, ch: int) -> np.ndarray:
    """Rows = positions, columns = channels (``ch`` is the channel axis)."""
    return np.moveaxis(arr, ch, -1).reshape(-1, arr.shape[ch])


def _affine(tail: Tail, out_shape: tuple[int, ...], ch: int,
            residuals: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)`` with ``z = scale * y + offset``: scale per channel, offset as rows x channels."""
    n = out_shape[ch]
    per_channel = (n,) + (1,) * (len(out_shape) - ch - 1)
    scale = np.ones(n)
    offset = np.zeros(out_shape)
    for kind, arg in tail.steps:
        if kind == "bn":
            g, h = arg
            if g.shape != (n,):
                raise ValueError(f"BatchNorm has {g.shape[0]} channels, the layer {n}")
            scale = scale * g
            offset = offset * g.reshape(per_channel) + h.reshape(per_channel)
        else:
            r = residuals[arg] if isinstance(arg, str) else arg
            try:
                offset = offset + np.broadcast_to(r, out_shape)
            except ValueError:
                raise ValueError(f"Add input of shape {r.shape} does not broadcast to {out_shape}") from None
    return scale, _rows(offset, ch)


def _match_channels(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """For each student output column, the teacher column it came from: greedy one-to-one matching
    by absolute correlation (a pruned layer's kept channel still correlates ~1 with its original)."""
    s = (student - student.mean(0)) / (student.std(0) + 1e-12)
    t = (teacher - teacher.mean(0)) / (teacher.std(0) + 1e-12)
    corr = np.abs(s.T @ t) / len(s)
    chosen = np.full(corr.shape[0], -1)
    used = set()
    for flat in np.argsort(-corr, axis=None):
        i, j = divmod(int(flat), corr.shape[1])
        if chosen[i] < 0 and j not in used:
            chosen[i] = j
            used.add(j)
            if len(used) == corr.shape[0]:
                break
    return chosen


def _rel_err(pred: np.ndarray, target: np.ndarray) -> float:
    denom = float(np.linalg.norm(target))
    return float(np.linalg.norm(pred - target) / denom) if denom > 0 else float(np.linalg.norm(pred))


def _matmul_bias_unsafe(node: ir.Node) -> str:
    """Why a bias ``Add`` must not follow this MatMul ("" when it may)."""
    out = node.outputs[0]
    readers = {u.op_type for u in out.consumers()}
    if readers & {"QuantizeLinear", "DynamicQuantizeLinear"}:
        return "output is quantized (a bias Add would split the MatMul -> QuantizeLinear pattern); bias not fitted"
    if out.shape is not None and len(out.shape) == 0:
        return "output is a scalar; bias not fitted"
    return ""


def _bias_add_constant(node: ir.Node) -> ir.Value | None:
    """The constant of a bias ``Add`` that is the MatMul's only reader, when that constant is
    per output column (shape ``(n,)`` or ``(1, ..., n)``) and read by nobody else."""
    out = node.outputs[0]
    users = list(out.consumers())
    if len(users) != 1 or out.is_graph_output():
        return None
    add = users[0]
    if add.op_type != "Add" or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    arr = const_value(other)
    if arr is None or arr.dtype != np.float32 or arr.ndim == 0 or any(d != 1 for d in arr.shape[:-1]):
        return None
    if len(list(other.consumers())) != 1 or other.is_graph_output() or other.is_graph_input():
        return None
    return other


def _add_matmul_bias(node: ir.Node, w_val: ir.Value, b: np.ndarray, stats: PassStats) -> None:
    """``y = x W`` gets ``+ b``: folded into the bias ``Add`` that already follows (exporters write
    Linear on 3-D input as MatMul + Add), else a new ``Add`` with a new initializer. The Add's
    output takes the MatMul output's name (and graph-output slot), so readers by name see y + b."""
    k = _bias_add_constant(node)
    if k is not None:
        old = const_value(k)
        if old.shape[-1] == b.size:
            set_constant(k, (old + b.reshape(old.shape)).astype(np.float32))
            stats.count("matmul_bias_folded")
            return
    graph = node.graph
    out = node.outputs[0]
    bias_v = make_initializer(graph, f"{w_val.name}_bias", b)
    add = ir.node("Add", inputs=[out, bias_v], num_outputs=1, name=unique_name(graph, f"{node.name}_bias"))
    new = add.outputs[0]
    new.type, new.shape = out.type, out.shape
    graph.insert_after(node, add)
    for user, idx in list(out.uses()):
        if user is not add:
            user.replace_input_with(idx, new)
    outputs = graph.outputs
    for i, v in enumerate(list(outputs)):
        if v is out:
            outputs[i] = new
    name = out.name
    out.name = unique_name(graph, f"{name}_nobias")
    new.name = name
    stats.count("matmul_bias_added")
