"""What this machine's processor can do fast: which precision a generation should run in here.

bf16 is the production precision on GPUs and on CPUs with bf16 units (AMX tiles, avx512_bf16). A CPU
without them emulates bf16 matmuls on scalar code, about a hundred times slower than float32 (measured on
an AMD EPYC with avx2 only: 1 against 126 GFLOP/s), so "auto" picks float32 there.
"""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown model"


def bf16_units() -> str:
    """Which bf16 instruction sets the CPU reports: 'amx_bf16', 'avx512_bf16' or 'no bf16 units'."""
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return "+".join(found) if found else "no bf16 units"


def fast_precision(device: str = "cpu") -> str:
    """The precision "auto" means: bfloat16 on a GPU or a CPU with bf16 units, else float32."""
    return "bfloat16" if device != "cpu" or bf16_units() != "no bf16 units" else "float32"
