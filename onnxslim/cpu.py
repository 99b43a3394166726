"""What this machine's CPU offers 8-bit inference: read from /proc/cpuinfo, for quantization's
choice of form and for the machine line of a benchmark.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# x86 and Arm CPU flags that give onnxruntime fast 8-bit dot products.
FAST_INT8_FLAGS = {
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "amx_int8": "AMX-INT8",
    "asimddp": "Arm dot product",
    "i8mm": "Arm int8 matrix multiply",
}


@dataclass(frozen=True)
class CpuInt8Support:
    """What this CPU offers 8-bit inference, and the conclusion drawn from it."""

    model: str
    flags: tuple[str, ...]
    fast_int8: bool
    reason: str
    saturates: bool = False  # x86 without VNNI: u8 x s8 pairs add in 16 bits (see REDUCED_WEIGHT_LIMIT)


def cpu_int8_support(cpuinfo: str | None = None) -> CpuInt8Support:
    """Read /proc/cpuinfo (or the text given) for 8-bit dot-product instructions."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model = _cpuinfo_field(cpuinfo, ("model name", "Hardware", "CPU part")) or platform.processor() or "unknown CPU"
    flags = set((_cpuinfo_field(cpuinfo, ("flags", "Features")) or "").split())
    found = tuple(sorted(flag for flag in FAST_INT8_FLAGS if flag in flags))
    relevant = tuple(sorted(flag for flag in flags if flag in {"avx2", "avx512f", "avx512bw", "sse4_1"} | set(FAST_INT8_FLAGS)))
    if found:
        names = ", ".join(FAST_INT8_FLAGS[flag] for flag in found)
        return CpuInt8Support(model, relevant, True, f"{model} has {names}")
    if platform.machine().lower() in ("arm64", "aarch64") and not cpuinfo:
        return CpuInt8Support(model, relevant, True, f"{model}: Apple/Arm64 CPUs have dot-product instructions")
    x86 = bool(flags & {"sse4_1", "avx2"}) or platform.machine().lower() in ("x86_64", "amd64")
    detail = "AVX2 but no VNNI" if "avx2" in flags else "no 8-bit dot-product instructions"
    return CpuInt8Support(model, relevant, False, f"{model} has {detail}", saturates=x86)


def _cpuinfo_field(text: str, keys: Sequence[str]) -> str | None:
    for key in keys:
        match = re.search(rf"^{re.escape(key)}\s*:\s*(.*)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None
