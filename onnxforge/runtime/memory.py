"""Process memory: current and peak resident set size, per pass, and an up-front estimate.

Linux only (``/proc/self/status``); elsewhere every reading is ``None`` and nothing is refused.

* ``VmHWM`` is the kernel's high-water mark of the resident set (anonymous + file-backed pages).
  Writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS, so :class:`PeakMemory`
  can measure the peak of one block of code (a pass) rather than of the whole process. The reset
  also resets ``getrusage``'s ``ru_maxrss`` (the same counter): to measure a whole run from
  outside, sample ``/proc/<pid>/status`` (as ``bench/bench_scale.py`` does).
* ``RssAnon`` is memory the process allocated itself (numpy arrays, protobuf); ``RssFile`` counts
  pages of memory-mapped files (external data), which the kernel can drop and re-read at will.
  The kernel keeps no peak of either, so :class:`PeakMemory` samples them from a thread.

:func:`estimate_peak` is what ``optimize --max-memory`` uses: weights streamed one tensor at a
time cost a few of the largest tensors; a pass that needs the whole model in memory (verification
and benchmarking serialize it for onnxruntime; static int8, pruning and reconstruction build
in-memory copies) costs the model's bytes at least.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterable

__all__ = [
    "BASE_BYTES",
    "STREAMING_PASSES",
    "MemoryEstimate",
    "PASSES_HOLDING_WEIGHTS",
    "PeakMemory",
    "estimate_peak",
    "parse_size",
    "read_status",
    "reset_peak",
]

_STATUS = "/proc/self/status"
_active: list["PeakMemory"] = []  # nested measurements: an inner reset must not hide an outer peak
_active_lock = threading.Lock()
_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")

#: Interpreter, numpy, onnx, onnxruntime and torch-free onnxforge imports (measured ~250 MB).
BASE_BYTES = 400 * 2**20

#: Passes that read and write weights one tensor at a time (with the spill store active), as the
#: number of "largest tensors" they hold at once. Anything not listed holds the whole model.
STREAMING_PASSES: dict[str, float] = {
    # structural passes: read no weights, or one small constant at a time
    "lift-constants": 1, "fold-constants": 2, "simplify": 1, "eliminate-identity": 0, "cse": 1,
    "remove-unused": 0, "strip-metadata": 0, "topo-sort": 0, "infer-shapes": 0,
    # hashes each initializer in chunks from the memory map
    "dedup-initializers": 1,
    # quantizers: float64 working copy of one weight plus its outputs
    "quantize-weights-int4": 4, "quantize-dynamic": 4, "convert-fp16": 2,
    # fold one weight at a time and spill it: the weight, its scaled copy and the float64 temporaries
    "fold-batchnorm": 4, "fold-affine": 4,
}


#: Passes that keep every weight they rewrite in memory until they finish, as a fraction of the model's
#: bytes. Empty now: fold-batchnorm/fold-affine spill each folded weight as they build it (measured:
#: BENCHMARKS.md "Scale"). A new pass that holds weights belongs here.
PASSES_HOLDING_WEIGHTS: dict[str, float] = {}


def read_status() -> dict[str, int] | None:
    """``{"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"}`` in bytes, or None off Linux."""
    try:
        with open(_STATUS, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _FIELDS:
            out[key] = int(rest.split()[0]) * 1024  # reported in kB
    return out or None


def reset_peak() -> bool:
    """Reset the kernel's high-water mark (``VmHWM``) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: peak RSS, anonymous and file-backed memory while the block runs.

    ``with PeakMemory() as m: ...`` then ``m.to_dict()`` gives ``peak_rss`` (kernel ``VmHWM``, exact
    when the reset worked), ``peak_anon`` / ``peak_file`` (sampled every ``interval`` seconds, so
    a spike shorter than that can be missed) and ``start_rss``/``end_rss``, all in bytes. Off
    Linux every field is None.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start: dict[str, int] | None = None
        self.end: dict[str, int] | None = None
        self.peak_rss: int | None = None
        self.peak_anon: int | None = None
        self.peak_file: int | None = None
        self.hwm_reset = False
        self._hwm_before_resets = 0  # VmHWM seen when an inner measurement reset it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        s = read_status()
        if s is None:
            return
        self.peak_anon = max(self.peak_anon or 0, s.get("RssAnon", 0))
        self.peak_file = max(self.peak_file or 0, s.get("RssFile", 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        with _active_lock:
            now = read_status()
            for outer in _active:
                outer._hwm_before_resets = max(outer._hwm_before_resets, (now or {}).get("VmHWM", 0))
            self.hwm_reset = reset_peak()
            _active.append(self)
        self.start = read_status()
        if self.start is not None:
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="onnxforge-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with _active_lock:
            if self in _active:
                _active.remove(self)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._sample()
        self.end = read_status()
        if self.end is not None:
            # Without the reset VmHWM is the process's peak so far: an upper bound for the block.
            self.peak_rss = max(self.end.get("VmHWM", 0), self._hwm_before_resets)

    def to_dict(self) -> dict[str, int | bool | None]:
        return {
            "peak_rss": self.peak_rss,
            "peak_anon": self.peak_anon,
            "peak_file": self.peak_file,
            "start_rss": self.start.get("VmRSS") if self.start else None,
            "end_rss": self.end.get("VmRSS") if self.end else None,
            "exact": self.hwm_reset,
        }


# --------------------------------------------------------------------------- estimate


@dataclasses.dataclass
class MemoryEstimate:
    """Predicted peak of a pipeline run, and the pass (or step) that sets it."""

    bytes: int
    culprit: str
    why: str


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"8G"``, ``"8GB"``, ``"8GiB"``, ``"512M"``, ``"1.5g"``, ``"1000000"`` -> bytes (powers of 1024).

    Raises:
        ValueError: not a size.
    """
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 8G, 512M, 1.5GiB)")
    unit = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def estimate_peak(
    model_bytes: int,
    largest_tensor_bytes: int,
    pass_names: Iterable[str],
    *,
    verify: bool = False,
    bench: bool = False,
) -> MemoryEstimate:
    """Estimate the peak RSS of running ``pass_names`` over a model (then saving it).

    Streaming passes (:data:`STREAMING_PASSES`) cost ``factor x largest_tensor_bytes``; those in
    :data:`PASSES_HOLDING_WEIGHTS` their share of the model (+ 2 tensors); any other
    pass, and ``verify``/``bench`` (onnxruntime gets the serialized model, and builds its own
    copy), cost ``2 x model_bytes``. Plus :data:`BASE_BYTES`. Deliberately coarse: it is there to
    refuse a run that cannot fit before an hour of work, not to predict to the megabyte.
    """
    best = MemoryEstimate(BASE_BYTES + 2 * largest_tensor_bytes, "load/save",
                          "load and save stream one tensor at a time")
    steps: list[tuple[str, int, str]] = []
    for name in pass_names:
        factor = STREAMING_PASSES.get(name)
        if name in PASSES_HOLDING_WEIGHTS:
            share = PASSES_HOLDING_WEIGHTS[name]
            steps.append((name, int(share * model_bytes) + 2 * largest_tensor_bytes,
                          "keeps every weight it rewrites in memory until it finishes"))
        elif factor is None:
            steps.append((name, 2 * model_bytes, "holds the whole model in memory"))
        else:
            steps.append((name, int(factor * largest_tensor_bytes),
                          f"streams weights ({factor:g} x the largest tensor)"))
    if verify:
        steps.append(("--verify", 2 * model_bytes, "onnxruntime runs the whole serialized model"))
    if bench:
        steps.append(("--bench", 2 * model_bytes, "onnxruntime runs the whole serialized model"))
    for name, cost, why in steps:
        if BASE_BYTES + cost > best.bytes:
            best = MemoryEstimate(BASE_BYTES + cost, name, why)
    return best
