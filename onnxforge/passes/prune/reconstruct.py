"""``reconstruct``: gradient-free, layer-wise re-fit of a pruned (or otherwise changed) model to its
unpruned teacher on calibration data.

For every Conv / Gemm / MatMul of the student whose weight differs from the teacher's layer of the
same node name (in topological order), with ``X`` the student's input to that layer *as it is now*
(earlier layers already re-fitted) and ``Y`` the teacher's output of that layer (before BatchNorm
and the nonlinearity), restricted to the output channels the student kept:

    [W; b] = argmin ||[X 1] [W; b] - Y||^2 + lambda ||W||^2,     lambda = ridge * tr(X^T X) / d

solved in closed form, ``(A^T A + lambda I') [W; b] = A^T Y`` with ``A = [X 1]`` (the bias column is
not regularized). For a Conv, ``X`` is the im2col matrix of the input (rows = output positions,
columns = kept input channels x kernel), so the fit is exact least squares over the kept input
channels: the removed channels' contribution is redistributed over the kept ones, and the bias
absorbs the mean shift (bias correction). Gemm (``alpha = beta = 1``) fits ``B`` and ``C``; MatMul
fits ``B`` only (it has no bias input). Rows are subsampled to ``max_rows``.

A layer's new weights are kept only if its error on the calibration rows went down. The relative
error ``||Y_student - Y_teacher|| / ||Y_teacher||`` of each layer before and after is reported in
``stats.details["layers"]``.

Pairing student and teacher channels: ``prune-channels`` records, on each pruned node, which of
the original output channels it kept (``node.meta["onnxforge.prune.kept_out"]``, in memory only).
When that record is absent (the model was saved and reloaded in between) each student channel is
paired with the teacher channel its current output correlates with most (one-to-one, greedy).

Lossy (it changes weights to match a teacher, not to preserve the student's outputs); no bound.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from onnxforge.errors import CalibrationDataError, PassOptionError
from onnxforge.ir.graph import const_value
from onnxforge.passes.base import Pass, PassStats
from onnxforge.passes.prune.shrink import KEPT_META, set_constant
from onnxforge.passes.registry import register_pass

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


@register_pass("reconstruct")
class ReconstructPass(Pass):
    """Re-fit each changed Conv/Gemm/MatMul by ridge least squares to the teacher's outputs. Lossy.

    Needs ``context.reference_model`` (the teacher) and ``context.calibration_data``. See the module
    docstring for the math.
    """

    lossless = False
    tolerance = math.inf

    def __init__(self, ridge: float = 1e-3, max_rows: int = 20000, layers: str = "changed"):
        super().__init__()
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if layers not in ("changed", "all"):
            raise ValueError(f"layers must be 'changed' or 'all', got {layers!r}")
        self.ridge = ridge
        self.max_rows = max_rows
        self.layers = layers

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
            layers.append((node, t))
        if not layers:
            stats.note("no changed layer to re-fit")
            return False
        teacher_out = collect(teacher, data, [t.outputs[0].name for _, t in layers], max_samples=max_samples)
        rng = np.random.default_rng(self.context.seed)
        report = []
        changed = False
        for node, t in layers:
            y_name = t.outputs[0].name
            if y_name not in teacher_out:
                stats.skip(node, f"teacher output {y_name!r} could not be collected")
                continue
            x_name = node.inputs[0].name
            xs = collect(model, data, [x_name], max_samples=max_samples)
            if x_name not in xs:
                stats.skip(node, f"student input {x_name!r} could not be collected")
                continue
            row = self._refit(node, np.concatenate(xs[x_name]), np.concatenate(teacher_out[y_name]), rng, stats)
            if row is not None:
                report.append(row)
                if row["accepted"]:
                    changed = True
                    stats.count("layers_refit")
        stats.details["layers"] = report
        return changed

    def _unsupported(self, node: ir.Node, w: np.ndarray, tw: np.ndarray | None) -> str:
        if tw is None:
            return "teacher weight is not a constant"
        if node.op_type == "Conv":
            if int(_attr(node, "group", 1)) != 1:
                return "grouped / depthwise Conv is not re-fitted"
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

    def _refit(self, node: ir.Node, x: np.ndarray, y: np.ndarray, rng, stats: PassStats) -> dict | None:
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
        if op == "Conv":
            o, c, kh, kw = w.shape
            a = im2col(x.astype(np.float64), node, (kh, kw))
            y = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
            w_mat = w.reshape(o, -1).T
        else:
            a = x.reshape(-1, x.shape[-1]).astype(np.float64)
            y = y.reshape(-1, y.shape[-1])
            w_mat = w.T if trans_b else w
        if a.shape[0] > self.max_rows:
            idx = rng.choice(a.shape[0], self.max_rows, replace=False)
            a, y = a[idx], y[idx]
        if kept is None and y.shape[1] != w_mat.shape[1] and a.shape[1] == w_mat.shape[0]:
            kept = _match_channels(a @ w_mat, y)
            stats.note(f"{node.name}: output channels paired with the teacher's by correlation (no pruning record)")
        if kept is not None:
            y = y[:, np.asarray(kept)]
        if a.shape[0] != y.shape[0] or a.shape[1] != w_mat.shape[0] or y.shape[1] != w_mat.shape[1]:
            stats.skip(node, f"activation shapes do not line up ({a.shape}, {y.shape}, weight {w_mat.shape})")
            return None
        y = y.astype(np.float64)
        fit_bias = op != "MatMul"
        b_old = np.zeros(w_mat.shape[1]) if bias is None else np.broadcast_to(bias, (w_mat.shape[1],)).astype(np.float64)
        if op == "Gemm" and bias is not None and bias.size not in (1, w_mat.shape[1]):
            fit_bias = False
        before = _rel_err(a @ w_mat + (b_old if op != "MatMul" else 0), y)
        design = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1) if fit_bias else a
        gram = design.T @ design
        d = a.shape[1]
        lam = self.ridge * float(np.trace(gram[:d, :d])) / max(d, 1)
        reg = np.full(design.shape[1], lam)
        if fit_bias:
            reg[-1] = 0.0
        try:
            sol = np.linalg.solve(gram + np.diag(reg), design.T @ y)
        except np.linalg.LinAlgError:
            stats.skip(node, "least-squares system is singular")
            return None
        w_new, b_new = (sol[:-1], sol[-1]) if fit_bias else (sol, None)
        after = _rel_err(design @ sol, y)
        accepted = after < before
        if accepted:
            if op == "Conv":
                set_constant(w_val, w_new.T.reshape(w.shape).astype(np.float32))
            else:
                set_constant(w_val, (w_new.T if trans_b else w_new).astype(np.float32))
            if b_new is not None:
                if b_val is None:
                    from onnxforge.ir.graph import make_initializer

                    node.resize_inputs(3)
                    node.replace_input_with(2, make_initializer(node.graph, f"{w_val.name}_bias", b_new.astype(np.float32)))
                else:
                    set_constant(b_val, b_new.astype(np.float32).reshape(bias.shape if bias.size == b_new.size else b_new.shape))
        return {"layer": node.name, "op": op, "rows": int(a.shape[0]), "error_before": before,
                "error_after": after if accepted else before, "accepted": bool(accepted)}


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
