"""On-disk cache of candidate results, so a re-run or a resumed run does no repeated work.

Layout: ``<cache_dir>/<model sha256[:16]>/<key>.json``, one file per candidate, written atomically
as soon as the candidate is done (an interrupted run keeps everything it finished). The key is the
sha256 of: the onnxforge version, the model's bytes hash, the pipeline string, the hash of the
calibration and evaluation data, and the evaluation settings that change a result (metric, latency mode, batch size, threads,
onnxruntime optimization level, target, seed). Changing any of them misses the cache; changing only
the search strategy, the budget or ``--max-drop`` does not. Early-stopped candidates are cached with
the ``max_drop`` they were stopped under and are re-evaluated when the budget is looser.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import numpy as np

from onnxforge.tune.evaluate import Candidate

VERSION = 1


def hash_arrays(arrays: dict[str, np.ndarray] | None) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays or {}):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def hash_source(source: Any) -> str:
    """Hash of calibration data given as a path (file or folder contents), arrays, or None."""
    if source is None:
        return "none"
    if isinstance(source, dict):
        return hash_arrays(source)
    path = pathlib.Path(str(source))
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes() if p.exists() else str(source).encode())
    return h.hexdigest()


class Cache:
    """Candidate results keyed by (model, pipeline, data, settings)."""

    def __init__(self, root: str | pathlib.Path | None, model_sha256: str, data_hash: str, settings: dict[str, Any]):
        self.root = pathlib.Path(root) if root else None
        self.model_sha256 = model_sha256
        self.data_hash = data_hash
        self.settings = settings
        self.hits = 0
        self.writes = 0

    @property
    def folder(self) -> pathlib.Path | None:
        return self.root / self.model_sha256[:16] if self.root else None

    def key(self, pipeline: str) -> str:
        from onnxforge import __version__  # another onnxforge may build the same pipeline differently

        blob = json.dumps({"v": VERSION, "onnxforge": __version__, "model": self.model_sha256, "pipeline": pipeline,
                           "data": self.data_hash, "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, pipeline: str, max_drop: float | None = None) -> Candidate | None:
        if self.folder is None:
            return None
        path = self.folder / f"{self.key(pipeline)}.json"
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn or foreign file: evaluate again
        cand = Candidate.from_dict(entry["candidate"])
        if cand.status == "early-stop":
            stopped_under = entry.get("max_drop")
            if max_drop is None or stopped_under is None or max_drop > stopped_under:
                return None  # the budget is looser now: the full evaluation may pass
        cand.cached = True
        self.hits += 1
        return cand

    def put(self, cand: Candidate, max_drop: float | None = None) -> None:
        if self.folder is None:
            return
        from onnxforge.atomic import atomic_write_bytes

        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"version": VERSION, "pipeline": cand.pipeline, "max_drop": max_drop, "settings": self.settings,
                 "candidate": {**cand.to_dict(), "cached": False}}
        atomic_write_bytes(self.folder / f"{self.key(cand.pipeline)}.json",
                           json.dumps(entry, indent=1, default=_default).encode())
        self.writes += 1


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
