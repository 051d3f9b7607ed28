"""Atomic file writes: write a temporary file beside the destination, then rename it into place.

A reader never sees a half-written file, and a failure leaves the old destination (if any) untouched.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

from onnxforge.errors import ModelSaveError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise ModelSaveError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also KeyboardInterrupt: never leave the temporary file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ModelSaveError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
