"""The decision record of ``quantize-int8``: what was measured once, replayed byte for byte.

Measured decisions (which nodes the accuracy budget keeps float, which int8 regions the latency
guard keeps, the bias corrections, the activation ranges ``range_search`` narrowed) and machine-dependent choices (the CPU's int8 path and the
weight range it implies) are written to a JSON file (option ``decisions=PATH``). When the file exists, the pass applies it
without measuring anything, so the same command on the same model and calibration data writes the
same bytes, on any machine.

The record names the float model it was made for (SHA-256 of the model as the pass saw it, after
BatchNorm folding and opset upgrade) and the options that shape the candidate set; a record for
another model or other options is refused (:class:`~onnxforge.errors.PassOptionError`): delete it
to measure again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

from onnxforge.errors import PassOptionError

FORMAT = "onnxforge-quantize-decisions/1"


@dataclasses.dataclass
class DecisionRecord:
    model_sha256: str
    options: dict[str, Any]
    quantized: list[tuple[int, str]]  # (node index in the prepared float model, node name)
    kept_float: dict[str, str]  # node name -> why it stays float (measured decisions only)
    choices: dict[str, Any]  # machine-dependent choices replayed as recorded (reduce_range, ...)
    measurements: dict[str, Any] = dataclasses.field(default_factory=dict)  # for people; never read back
    bias_delta: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # bias correction, replayed
    range_factors: dict[str, float] = dataclasses.field(default_factory=dict)  # range_search, replayed

    @staticmethod
    def fingerprint(float_bytes: bytes) -> str:
        return hashlib.sha256(float_bytes).hexdigest()

    def to_json(self) -> str:
        d = {"format": FORMAT, **dataclasses.asdict(self)}
        d["quantized"] = [list(x) for x in self.quantized]
        return json.dumps(d, indent=1, sort_keys=True, default=_jsonable) + "\n"

    def save(self, path: str | pathlib.Path) -> None:
        from onnxforge.atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | pathlib.Path) -> DecisionRecord:
        try:
            d = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PassOptionError(f"quantize-int8: cannot read the decision record {str(path)!r}: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PassOptionError(f"quantize-int8: {str(path)!r} is not a decision record ({FORMAT}); "
                                  "delete it or pass another decisions=PATH")
        try:
            return cls(d["model_sha256"], d["options"], [(int(i), str(n)) for i, n in d["quantized"]],
                       dict(d["kept_float"]), dict(d["choices"]), d.get("measurements", {}),
                       dict(d.get("bias_delta", {})), {str(k): float(v) for k, v in d.get("range_factors", {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise PassOptionError(f"quantize-int8: decision record {str(path)!r} is incomplete ({e})") from e

    def check(self, path: str, sha: str, options: dict[str, Any]) -> None:
        """Refuse a record made for another model or other options (naming what differs)."""
        if sha != self.model_sha256:
            raise PassOptionError(
                f"quantize-int8: the decision record {path!r} was made for another model (sha256 "
                f"{self.model_sha256[:12]}..., this one {sha[:12]}...): delete it to measure again")
        norm = json.loads(json.dumps(options, default=_jsonable))
        diff = sorted(k for k in set(norm) | set(self.options) if norm.get(k) != self.options.get(k))
        if diff:
            raise PassOptionError(
                f"quantize-int8: the decision record {path!r} was made with other options ({', '.join(diff)}): "
                "delete it to measure again")

    def chosen(self, names: list[str], path: str) -> set[int]:
        """Node indices to quantize; the recorded names must match the model's nodes."""
        out = set()
        for i, name in self.quantized:
            if i >= len(names) or names[i] != name:
                raise PassOptionError(f"quantize-int8: decision record {path!r}: node {i} is not {name!r}; "
                                      "delete the record to measure again")
            out.add(i)
        return out


def _jsonable(x: Any) -> Any:
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, (set, frozenset, tuple)):
        return sorted(x) if isinstance(x, (set, frozenset)) else list(x)
    return str(x)
