"""Activation calibration: stream intermediate tensors through reducers, then pick a range.

Every calibrated tensor gets a :class:`RangeReducer`: a running min/max and a signed histogram
over ``[-R, R]`` (``bins`` bins). ``R`` starts at the first batch's ``max|x|`` and doubles when a
later batch exceeds it (pairs of bins merge), so one pass over the data suffices and any shape
(variable-length inputs, batch sizes) is fine: a tensor is just a stream of numbers.

Methods (each returns the real range ``[lo, hi]`` that the quantizer maps onto the integer range):

* ``minmax``: the observed ``[min, max]``.
* ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles of the values (``p = 99.99`` by
  default), read off the cumulative histogram; outliers beyond them saturate.
* ``entropy``: TensorRT's KL-divergence calibration on the histogram of ``|x|``: for each candidate
  threshold ``T = i * bin_width`` (``i >= 128``), the clipped reference distribution ``P`` (outliers
  added to the last bin) is compared with ``Q``, ``P`` merged into 128 levels and expanded back;
  the ``T`` with the smallest ``KL(P || Q)`` wins and the range is ``[max(min, -T), min(max, T)]``.
  As in NVIDIA's pytorch-quantization, the zero bin is set to its neighbour's count first (ReLU
  zeros would otherwise dominate), and non-negative tensors use 256 levels.
* ``sqnr``: per tensor, whichever of ``minmax``, ``percentile`` (99.9, 99.99, 99.999) and ``entropy``
  gives the highest signal-to-quantization-noise ratio on the tensor's own histogram:
  ``SQNR = sum(n_b c_b^2) / sum(n_b e_b^2)`` over bins ``b`` (centre ``c_b``, count ``n_b``), with
  ``e_b`` the clipping error outside ``[lo, hi]`` and the rounding error ``s / sqrt(12)`` inside
  (``s = (hi - lo) / 255``, the range widened to contain 0 as the quantizer does). Outlier-heavy
  tensors get a clipped range, tensors whose tails carry signal keep theirs.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxforge.errors import CalibrationDataError

METHODS = ("minmax", "percentile", "entropy", "sqnr")


class RangeReducer:
    """Running min, max and signed histogram of one tensor's values (see module docstring)."""

    def __init__(self, bins: int = 4096, histogram: bool = True):
        assert bins % 4 == 0
        self.bins = bins
        self.histogram = histogram
        self.min = np.inf
        self.max = -np.inf
        self.radius = 0.0
        self.hist: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        x = x.astype(np.float32, copy=False).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size
        if not self.histogram:
            return
        absmax = max(-lo, hi)
        if self.hist is None:
            self.radius = absmax if absmax > 0 else 1e-8
            self.hist = np.zeros(self.bins, np.int64)
        while absmax > self.radius:
            self._double()
        counts, _ = np.histogram(x, bins=self.bins, range=(-self.radius, self.radius))
        self.hist += counts

    def _double(self) -> None:
        assert self.hist is not None
        n = self.bins
        merged = self.hist[0::2] + self.hist[1::2]
        new = np.zeros(n, np.int64)
        new[n // 4 : n // 4 + n // 2] = merged
        self.hist = new
        self.radius *= 2.0

    # ------------------------------------------------------------------ ranges
    def range(self, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 0.0
        if method == "minmax" or self.hist is None:
            return self.min, self.max
        if method == "percentile":
            return self._percentile(percentile)
        if method == "entropy":
            t = self._entropy_threshold()
            return max(self.min, -t), min(self.max, t)
        if method == "sqnr":
            return self.best_range(percentile)[1]
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")

    def sqnr(self, lo: float, hi: float, levels: int = 255) -> float:
        """SQNR (linear) of quantizing this histogram to ``levels`` steps over ``[lo, hi]`` (see above)."""
        assert self.hist is not None
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        edges = self._edges()
        c = 0.5 * (edges[:-1] + edges[1:])
        n = self.hist.astype(np.float64)
        s = (hi - lo) / levels if hi > lo else 1.0
        err = np.where(c < lo, (lo - c) ** 2, np.where(c > hi, (c - hi) ** 2, s * s / 12.0))
        noise = float(np.sum(n * err))
        signal = float(np.sum(n * c * c))
        return signal / noise if noise > 0 else np.inf

    def best_range(self, percentile: float = 99.99) -> tuple[str, tuple[float, float]]:
        """``(method, range)`` with the highest :meth:`sqnr` among the candidate methods."""
        if self.hist is None or self.count == 0:
            return "minmax", (self.min, self.max) if self.count else (0.0, 0.0)
        cands = {"minmax": (self.min, self.max), "entropy": self.range("entropy")}
        for p in sorted({99.9, 99.99, 99.999, percentile}):
            cands[f"percentile({p:g})"] = self._percentile(p)
        best = max(cands, key=lambda k: (self.sqnr(*cands[k]), k == "minmax"))
        return best, cands[best]

    def _edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def _percentile(self, p: float) -> tuple[float, float]:
        assert self.hist is not None
        cdf = np.cumsum(self.hist) / max(1, self.hist.sum())
        edges = self._edges()
        frac = p / 100.0
        hi_idx = int(np.searchsorted(cdf, frac, side="left"))
        lo_idx = int(np.searchsorted(cdf, 1.0 - frac, side="left"))
        hi = float(edges[min(hi_idx + 1, self.bins)])
        lo = float(edges[lo_idx])
        return max(self.min, lo), min(self.max, hi)

    def _entropy_threshold(self, quant_bins: int = 128) -> float:
        assert self.hist is not None
        half = self.bins // 2
        # |x| histogram: fold the negative half onto the positive one.
        absh = (self.hist[half:] + self.hist[:half][::-1]).astype(np.float64)
        # The bin at 0 holds every ReLU zero; left as is it dominates KL and pulls T far too low
        # (NVIDIA's pytorch-quantization does the same: bins[0] = bins[1]).
        absh[0] = absh[1]
        if self.min >= 0:
            quant_bins = 2 * quant_bins  # non-negative tensor: all 256 uint8 levels cover [0, T]
        width = self.radius / half
        nz = np.nonzero(absh)[0]
        if nz.size == 0:
            return 0.0
        last = int(nz[-1]) + 1
        if last <= quant_bins:
            return last * width
        total_tail = np.concatenate([np.cumsum(absh[::-1])[::-1], [0.0]])  # total_tail[i] = sum(absh[i:])
        best_i, best_kl = last, np.inf
        step = max(1, (last - quant_bins) // 128)
        for i in range(quant_bins, last + 1, step):
            ref = absh[:i].copy()
            ref[i - 1] += total_tail[i]
            sliced = absh[:i]
            # merge i bins into quant_bins levels (bin j -> level j * quant_bins // i)
            level = (np.arange(i) * quant_bins) // i
            sums = np.bincount(level, weights=sliced, minlength=quant_bins)
            nonzero = sliced > 0
            counts = np.bincount(level, weights=nonzero.astype(np.float64), minlength=quant_bins)
            expanded = np.where(nonzero, sums[level] / np.maximum(counts[level], 1), 0.0)
            p = ref / ref.sum()
            q_sum = expanded.sum()
            if q_sum == 0:
                continue
            q = expanded / q_sum
            mask = p > 0
            q_m = np.where(q[mask] > 0, q[mask], 1e-12)
            kl = float(np.sum(p[mask] * np.log(p[mask] / q_m)))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i * width


# ---------------------------------------------------------------------- running the model


def iter_feeds(data: object, limit: int | None) -> list[Mapping[str, np.ndarray]]:
    """The first ``limit`` feeds of ``data`` (CalibrationData, a list of feed dicts, any iterable)."""
    if data is None:
        raise CalibrationDataError("no calibration data")
    return list(itertools.islice(iter(data), limit) if limit else iter(data))


def collect_ranges(
    model: ir.Model,
    data: object,
    value_names: Sequence[str],
    *,
    method: str = "minmax",
    percentile: float = 99.99,
    num_samples: int | None = None,
    providers: Sequence[str] = ("cpu",),
    full_range: Sequence[str] = (),
    choices: dict[str, str] | None = None,
) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Run ``model`` on the calibration feeds: ``({name: (lo, hi)}, {name: why not calibrated})``.

    Uses :func:`onnxforge.runtime.activations.collect_stats` (onnxruntime with optimizations off,
    the named values exposed as outputs), streaming each tensor into a :class:`RangeReducer`.
    Tensors in ``full_range`` (the model's outputs: clipping them is never wanted) use min/max.
    With ``method="sqnr"``, ``choices`` (if given) receives the method each tensor picked.
    """
    from onnxforge.runtime.activations import collect_stats

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if data is None:
        raise CalibrationDataError("no calibration data")
    names = list(dict.fromkeys(value_names))
    if not names:
        return {}, {}
    stats = collect_stats(
        model, with_progress(data, num_samples, f"calibrating {len(names)} tensors"), names,
        lambda: _Sink(RangeReducer(histogram=method != "minmax")),
        providers=providers, max_samples=num_samples,
    )
    if stats.n_samples == 0:
        raise CalibrationDataError("calibration data produced no samples (is it empty?)")
    skipped = dict(stats.skipped)
    ranges = {}
    full = set(full_range)
    for name, sink in stats.items():
        if sink.reducer.count == 0:
            skipped[name] = "no finite values seen during calibration"
            continue
        ranges[name] = sink.reducer.range("minmax" if name in full else method, percentile)
        if method == "sqnr" and name not in full and choices is not None:
            choices[name] = sink.reducer.best_range(percentile)[0]
    return ranges, skipped


def with_progress(data: Iterable, limit: int | None, description: str) -> Iterable:
    """``data`` unchanged, or, when stderr is a terminal, a generator over it that drives a rich
    progress bar (transient: it leaves nothing behind; logs, pipes and tests see no output)."""
    if not _stderr_is_tty():
        return data
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if total is not None and limit:
        total = min(total, limit)
    return _progress(data, total, description)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _progress(data: Iterable, total: int | None, description: str) -> Iterator:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        for feeds in data:
            yield feeds
            bar.advance(task)


class _Sink:
    def __init__(self, reducer: RangeReducer):
        self.reducer = reducer

    def update(self, name: str, array: np.ndarray) -> None:
        self.reducer.update(array)


def run_outputs(
    model: ir.Model | bytes, feeds: Iterable[Mapping[str, np.ndarray]], *, optimize: bool = True, threads: int | None = None
) -> list[list[np.ndarray]]:
    """The model's outputs on each feed (onnxruntime CPU; ``optimize`` runs the fused int8 kernels)."""
    sess = make_session(model, optimize=optimize, threads=threads)
    names = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: np.asarray(v) for k, v in f.items() if k in names}) for f in feeds]


def make_session(model: ir.Model | bytes, *, optimize: bool = True, threads: int | None = None):
    """A CPU onnxruntime session (``optimize``: all graph optimizations, else none)."""
    from onnxforge.runtime.session import make_session as _make

    return _make(model, ("cpu",), threads=threads, optimize="all" if optimize else "disable").session
