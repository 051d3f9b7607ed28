"""What this CPU's integer (int8) path is, read from the CPU flags.

onnxruntime's CPU int8 kernels (MLAS) take a different code path per instruction set, and the path
decides what int8 choices pay:

* ``avx2`` / ``avx512`` without VNNI: u8 x s8 products are summed in pairs into int16
  (``vpmaddubsw``), which saturates when a uint8 activation far from 0 meets large int8 weights:
  weights need 7 bits there (see :func:`onnxforge.passes.quantize.qmath.u8s8_saturation_risk`).
* ``avx512_vnni`` / ``avx_vnni``: ``vpdpbusd`` accumulates u8 x s8 straight into int32: no
  saturation, full 8-bit weights, about 4x the fp32 multiply-add rate.
* ``amx``: Intel AMX tiles (Sapphire Rapids and later); onnxruntime's MLAS uses them for u8s8/s8s8
  GEMM where built in, else VNNI.
* ``arm_dot`` (``asimddp``) / ``arm_i8mm``: ARM's SDOT/UDOT (and SMMLA); s8s8 and u8u8 both run
  without saturation.

:func:`detect_isa` reads ``/proc/cpuinfo`` (Linux) or takes the flags as an argument, so tests
can fake any CPU.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Isa:
    """The int8-relevant features of a CPU. ``path`` names the fastest int8 path it has."""

    arch: str  # x86_64 | arm64 | other
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # AVX512_VNNI or AVX_VNNI: u8 x s8 -> int32 in one instruction
    amx: bool = False  # AMX_INT8 tiles
    arm_dot: bool = False  # ARMv8.2 dot product (SDOT/UDOT)
    arm_i8mm: bool = False  # ARMv8.6 int8 matrix multiply (SMMLA/UMMLA)
    model_name: str = ""

    @property
    def path(self) -> str:
        if self.arch == "x86_64":
            if self.amx:
                return "amx"
            if self.vnni:
                return "avx512_vnni" if self.avx512 else "avx_vnni"
            if self.avx512:
                return "avx512"
            if self.avx2:
                return "avx2"
            return "sse"
        if self.arch == "arm64":
            if self.arm_i8mm:
                return "arm_i8mm"
            return "arm_dot" if self.arm_dot else "neon"
        return "generic"

    @property
    def u8s8_saturates(self) -> bool:
        """Whether onnxruntime's u8 x s8 kernels sum pairs in int16 here (x86 without VNNI/AMX)."""
        return self.arch == "x86_64" and not (self.vnni or self.amx)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = self.path
        return d


def _read_cpuinfo() -> tuple[set[str], str]:
    flags: set[str] = set()
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("flags", "features") and not flags:
                    flags = set(value.split())
                elif key == "model name" and not name:
                    name = value.strip()
    except OSError:  # not Linux: no flags; the caller gets the conservative path
        pass
    return flags, name


def detect_isa(flags: Iterable[str] | None = None, *, arch: str | None = None, model_name: str = "") -> Isa:
    """The CPU's int8 features, from ``flags`` (a ``/proc/cpuinfo`` flag list) or this machine's.

    ``arch`` defaults to this machine's (``x86_64``/``arm64``); pass it with faked flags.
    """
    if flags is None:
        flags, model_name = _read_cpuinfo()
    fl = {f.lower() for f in flags}
    if arch is None:
        m = platform.machine().lower()
        arch = "x86_64" if m in ("x86_64", "amd64") else "arm64" if m in ("arm64", "aarch64") else m
    if arch == "arm64":
        return Isa("arm64", arm_dot="asimddp" in fl, arm_i8mm="i8mm" in fl, model_name=model_name)
    if arch != "x86_64":
        return Isa(arch, model_name=model_name)
    return Isa(
        "x86_64",
        avx2="avx2" in fl,
        avx512="avx512f" in fl and "avx512bw" in fl,
        vnni="avx512_vnni" in fl or "avx_vnni" in fl,
        amx="amx_int8" in fl and "amx_tile" in fl,
        model_name=model_name,
    )
