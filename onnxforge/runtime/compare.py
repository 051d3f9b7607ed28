"""How far a candidate's outputs are from a reference's: the one output comparator of onnxforge.

``Pipeline(verify=True)``, ``onnxforge compare`` and ``onnxforge tune`` all compare through this module.
Outputs are paired **by name**: a reference output missing from the candidate, an extra candidate
output, or a shape change is an :class:`OutputMismatchError` (a dropped or renamed output never
passes). Only unnamed outputs (lists of arrays) are paired by position, or with ``by_position=True``.

Per output (accumulated over every sample, in float64):

- ``max_abs``: ``max |ref - cand|``;
- ``max_rel``: ``max_abs / max |ref|`` -- relative to the output's scale, so that reference
  values near zero do not blow it up (0 when both are all zeros, inf when only ref is);
- ``mean_abs``: mean of ``|ref - cand|``;
- ``cosine``: ``<ref, cand> / (|ref| |cand|)`` over all elements (1 when both are zero);
- ``scale``: ``max |ref|`` over the finite reference values (what relative tolerances scale);
- ``top1_agreement``: for floating outputs of rank >= 2, the fraction of positions where the
  argmax over the class axis agrees (class axis: last for rank 2 and 3 -- ``[N, C]``,
  ``[N, T, vocab]`` -- and 1 for rank >= 4, ``[N, C, H, W]``); None for other outputs.

Non-finite values: where reference and candidate are both NaN, or the same infinity, the difference
is 0; anywhere else a NaN or infinite difference counts as ``inf`` (never NaN, which would compare
false against any bound and hide or invent a failure). ``cosine`` uses the positions finite on
both sides.

The summary takes the worst over outputs: max of ``max_abs``/``max_rel``, min of ``cosine`` and of
``top1_agreement``. With ``labels``, top-1 accuracy of both sides on the first output with a class
axis; with ``metric(reference, candidate) -> float``, its value on the outputs (concatenated over
samples along axis 0).

Pass/fail: :func:`within_tolerance` is the rule ``max_abs <= atol + rtol * scale`` (``rtol = inf``
accepts anything; ``scale = 0`` leaves ``atol``: never ``inf * 0``), :func:`tolerance_violation`
applies it to every output of a result. :func:`sample_cosines` is the per-sample cosine ``tune`` uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onnxforge.runtime._model import ModelLike, as_ir
from onnxforge.runtime.data import CalibrationData, DataSource, load
from onnxforge.runtime.session import make_session


class OutputMismatchError(ValueError):
    """The candidate's outputs do not correspond to the reference's (by name, or in shape)."""

    def __init__(self, message: str, *, missing: Sequence[str] = (), extra: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)
        self.extra = list(extra)


@dataclass
class OutputDiff:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None
    scale: float = 0.0  # max |ref| over finite values


def within_tolerance(max_abs: float, scale: float, rtol: float, atol: float) -> bool:
    """``max_abs <= atol + rtol * scale``, defined for every input.

    ``rtol = inf`` accepts any difference (even on an all-zero output, where ``inf * 0`` is NaN and
    the naive test fails a correct result); ``scale = 0`` (all-zero reference) leaves ``atol``.
    A NaN ``max_abs`` fails.
    """
    if math.isinf(rtol) and rtol > 0:
        return True
    bound = atol + (rtol * scale if scale > 0 else 0.0)
    return bool(max_abs <= bound)


def tolerance_violation(result: "CompareResult", rtol: float, atol: float) -> str:
    """``""`` when every output of ``result`` is :func:`within_tolerance`, else one line naming the
    first output that is not."""
    for o in result.per_output:
        if not within_tolerance(o.max_abs, o.scale, rtol, atol):
            return f"output {o.name!r} max abs diff {o.max_abs:.3g} > {atol:g} + {rtol:g} × {o.scale:.3g} (max |output|)"
    return ""


def abs_diff(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """``|ref - cand|`` in float64, with equal non-finite values (NaN/NaN, inf/inf) at 0 and any
    other non-finite difference at ``inf``."""
    r = np.asarray(ref).astype(np.float64)
    c = np.asarray(cand).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(r - c)
    bad = ~np.isfinite(d)
    if bad.any():
        same = (r == c) | (np.isnan(r) & np.isnan(c))
        d = np.where(same, 0.0, np.where(bad, np.inf, d))
    return d


def pair_outputs(
    reference: Sequence[str], candidate: Sequence[str], *, by_position: bool = False
) -> list[tuple[str, str]]:
    """``(reference name, candidate name)`` pairs: by name, or by position when asked.

    Raises:
        OutputMismatchError: a reference output missing from the candidate or an extra candidate
            output (by name), or different counts (by position).
    """
    reference, candidate = list(reference), list(candidate)
    if by_position:
        if len(reference) != len(candidate):
            raise OutputMismatchError(
                f"{len(reference)} reference outputs {reference} vs {len(candidate)} candidate outputs {candidate}"
            )
        return list(zip(reference, candidate))
    missing = [n for n in dict.fromkeys(reference) if n not in set(candidate)]
    extra = [n for n in dict.fromkeys(candidate) if n not in set(reference)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"output(s) {', '.join(map(repr, missing))} missing from the candidate")
        if extra:
            parts.append(f"extra candidate output(s) {', '.join(map(repr, extra))}")
        raise OutputMismatchError("; ".join(parts), missing=missing, extra=extra)
    return [(n, n) for n in dict.fromkeys(reference)]


@dataclass
class CompareResult:
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    per_output: list[OutputDiff]
    n_samples: int = 1
    metric: float | None = None
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    providers_used: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def class_axis(shape: Sequence[int]) -> int | None:
    """The axis holding class scores for a top-1 comparison, or None."""
    if len(shape) < 2:
        return None
    axis = len(shape) - 1 if len(shape) <= 3 else 1
    return axis if shape[axis] > 1 else None


class _Acc:
    """Running per-output statistics across samples."""

    def __init__(self, name: str):
        self.name = name
        self.shape: tuple[int, ...] = ()
        self.max_abs = 0.0
        self.ref_max = 0.0
        self.abs_sum = 0.0
        self.count = 0
        self.dot = self.rr = self.cc = 0.0
        self.agree = 0
        self.rows = 0
        self.top1 = True

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref, cand = np.asarray(ref), np.asarray(cand)
        if ref.shape != cand.shape:
            raise OutputMismatchError(
                f"output {self.name!r}: shape changed: reference {ref.shape} vs candidate {cand.shape}"
            )
        self.shape = ref.shape
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        if ref.size:
            diff = abs_diff(r, c)
            self.max_abs = max(self.max_abs, float(diff.max()))
            finite = np.abs(r[np.isfinite(r)])
            if finite.size:
                self.ref_max = max(self.ref_max, float(finite.max()))
            self.abs_sum += float(diff.sum())
            self.count += diff.size
            # cosine over the finite positions only (a NaN would poison the sums)
            ok = np.isfinite(r) & np.isfinite(c)
            rf, cf = (r, c) if ok.all() else (r[ok], c[ok])
            self.dot += float(np.vdot(rf, cf))
            self.rr += float(np.vdot(rf, rf))
            self.cc += float(np.vdot(cf, cf))
        axis = class_axis(ref.shape) if np.issubdtype(ref.dtype, np.floating) else None
        if axis is None:
            self.top1 = False
        elif self.top1:
            a, b = np.argmax(r, axis=axis), np.argmax(c, axis=axis)
            self.agree += int((a == b).sum())
            self.rows += a.size

    def result(self) -> OutputDiff:
        if self.ref_max > 0:
            max_rel = self.max_abs / self.ref_max
        else:
            max_rel = 0.0 if self.max_abs == 0 else float("inf")
        if self.rr == 0 and self.cc == 0:
            cosine = 1.0
        elif self.rr == 0 or self.cc == 0:
            cosine = 0.0
        else:
            cosine = self.dot / np.sqrt(self.rr * self.cc)
        return OutputDiff(
            name=self.name,
            shape=tuple(self.shape),
            max_abs=self.max_abs,
            max_rel=max_rel,
            mean_abs=self.abs_sum / self.count if self.count else 0.0,
            cosine=float(min(cosine, 1.0)),
            top1_agreement=(self.agree / self.rows if self.rows else None) if self.top1 else None,
            scale=self.ref_max,
        )


def _as_samples(outputs: Any) -> tuple[list[dict[str, np.ndarray]], bool]:
    """One sample (dict or list of arrays) or many (a list of those) -> (list of dicts, named?)."""
    if isinstance(outputs, Mapping):
        return [dict(outputs)], True
    outputs = list(outputs)
    if outputs and isinstance(outputs[0], Mapping):
        return [dict(o) for o in outputs], True
    if outputs and isinstance(outputs[0], (list, tuple)):
        return [{str(i): np.asarray(a) for i, a in enumerate(o)} for o in outputs], False
    return [{str(i): np.asarray(a) for i, a in enumerate(outputs)}], False




def _concat(samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in samples[0]:
        arrays = [np.asarray(s[name]) for s in samples]
        try:
            out[name] = np.concatenate(arrays, axis=0) if arrays[0].ndim else np.stack(arrays)
        except ValueError:  # varying shapes (sequence lengths): keep the list
            out[name] = arrays
    return out


def compare(
    reference_outputs: Any,
    candidate_outputs: Any,
    *,
    labels: np.ndarray | Sequence[int] | None = None,
    metric: Callable[[dict[str, Any], dict[str, Any]], float] | None = None,
    by_position: bool = False,
) -> CompareResult:
    """Compare outputs: one sample (``{name: array}`` or a list of arrays) or a list of samples.

    Outputs are matched by name; by position only when a side gives unnamed outputs (lists of
    arrays) or ``by_position=True``.

    Raises:
        OutputMismatchError: missing/extra outputs (by name), different counts, or a shape change.
    """
    (refs, ref_named), (cands, cand_named) = _as_samples(reference_outputs), _as_samples(candidate_outputs)
    if len(refs) != len(cands):
        raise ValueError(f"{len(refs)} reference samples vs {len(cands)} candidate samples")
    if not refs or not refs[0]:
        raise ValueError("no outputs to compare")
    pairs = pair_outputs(list(refs[0]), list(cands[0]), by_position=by_position or not (ref_named and cand_named))
    accs = {rname: _Acc(rname) for rname, _ in pairs}
    for ref, cand in zip(refs, cands):
        for rname, cname in pairs:
            accs[rname].update(ref[rname], cand[cname])
    per_output = [acc.result() for acc in accs.values()]
    top1s = [o.top1_agreement for o in per_output if o.top1_agreement is not None]
    result = CompareResult(
        max_abs=max(o.max_abs for o in per_output),
        max_rel=max(o.max_rel for o in per_output),
        cosine=min(o.cosine for o in per_output),
        top1_agreement=min(top1s) if top1s else None,
        per_output=per_output,
        n_samples=len(refs),
    )
    if labels is not None:
        result.reference_accuracy, result.candidate_accuracy = _accuracies(refs, cands, pairs, labels)
    if metric is not None:
        ref_cat = _concat(refs)
        cand_cat = _concat([{rname: s[cname] for rname, cname in pairs} for s in cands])
        result.metric = float(metric(ref_cat, cand_cat))
    return result


def _accuracies(refs, cands, pairs, labels) -> tuple[float, float]:
    for rname, cname in pairs:
        first = np.asarray(refs[0][rname])
        axis = class_axis(first.shape) if np.issubdtype(first.dtype, np.floating) else None
        if axis is None:
            continue
        ref_pred = np.concatenate([np.argmax(np.asarray(s[rname]), axis=axis).reshape(-1) for s in refs])
        cand_pred = np.concatenate([np.argmax(np.asarray(s[cname]), axis=axis).reshape(-1) for s in cands])
        labels = np.asarray(labels).reshape(-1)
        if labels.shape != ref_pred.shape:
            raise ValueError(f"{labels.size} labels for {ref_pred.size} predictions of output {rname!r}")
        return float((ref_pred == labels).mean()), float((cand_pred == labels).mean())
    raise ValueError("labels given but no output has a class axis (a float output of rank >= 2)")


def compare_models(
    reference: ModelLike,
    candidate: ModelLike,
    data: DataSource | CalibrationData,
    providers: Sequence[str] = ("cpu",),
    *,
    labels: np.ndarray | Sequence[int] | None = None,
    metric: Callable[[dict[str, Any], dict[str, Any]], float] | None = None,
    optimize: str | bool = "disable",
    max_samples: int | None = None,
) -> CompareResult:
    """Run both models on the same inputs (``data``: anything :func:`onnxforge.runtime.data.load`
    accepts) and :func:`compare` their outputs. ``providers_used`` on the result says where each ran.
    """
    ref_ir = as_ir(reference)
    samples = load(data, ref_ir, n=max_samples)
    ref_info = make_session(ref_ir, providers, optimize=optimize)
    cand_info = make_session(candidate, providers, optimize=optimize)
    ref_names = [o.name for o in ref_info.session.get_outputs()]
    cand_names = [o.name for o in cand_info.session.get_outputs()]
    refs, cands = [], []
    for feeds in samples:
        refs.append(dict(zip(ref_names, ref_info.session.run(ref_names, feeds))))
        cands.append(dict(zip(cand_names, cand_info.session.run(cand_names, feeds))))
    result = compare(refs, cands, labels=labels, metric=metric)
    result.providers_used = {"reference": ref_info.providers_used, "candidate": cand_info.providers_used}
    return result


def sample_cosines(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> np.ndarray:
    """Per-sample cosine similarity: row ``i`` of every output (leading axis = samples),
    outputs paired by name and concatenated in the reference's order; 1 where both rows are zero.

    Raises:
        OutputMismatchError: missing/extra outputs or a shape change.
    """
    pairs = pair_outputs(list(reference), list(candidate))
    rows_r, rows_c = [], []
    for rname, cname in pairs:
        r, c = np.asarray(reference[rname]), np.asarray(candidate[cname])
        if r.shape != c.shape:
            raise OutputMismatchError(f"output {rname!r}: shape changed: reference {r.shape} vs candidate {c.shape}")
        rows_r.append(r.astype(np.float64).reshape(len(r), -1))
        rows_c.append(c.astype(np.float64).reshape(len(c), -1))
    r, c = np.concatenate(rows_r, axis=1), np.concatenate(rows_c, axis=1)
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    den = nr * nc
    both_zero = (nr == 0) & (nc == 0)
    return np.where(both_zero, 1.0, np.sum(r * c, axis=1) / np.where(den > 0, den, 1.0))
