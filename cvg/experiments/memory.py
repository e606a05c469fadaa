"""Peak resident memory of a piece of work on Linux, for CPU runs that have no allocator statistics.

Run the work in a fresh process started with `ISOLATED_ENV`: glibc then serves every large buffer
with its own mmap and returns it on free, so resident memory follows live tensors and the high-water
mark (reset through /proc/self/clear_refs) measures what the work itself held at its peak.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TypeVar

ISOLATED_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
_R = TypeVar("_R")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line: peak memory needs Linux")
    return int(match.group(1))


def peak_extra_bytes(work: Callable[[], _R]) -> tuple[_R, int]:
    """Run `work()`; return its result and the peak resident memory above the level before it (0 when the
    work's buffers fit in memory already mapped: the kernel may even reclaim pages meanwhile)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    before = _status_kib("VmRSS")
    result = work()
    return result, max(0, _status_kib("VmHWM") - before) * 1024


def warm_peak(call: Callable, what: str) -> dict[str, float]:
    """Seconds and peak extra bytes of one `call()` after a warm-up call (one-off allocations, oneDNN
    primitives, RoPE tables, stay out of the figures); a non-finite result is an error naming `what`."""
    import torch

    call()
    start = time.perf_counter()
    out, peak = peak_extra_bytes(call)
    seconds = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"{what}: non-finite output")
    return {"seconds": seconds, "peak_bytes": peak}
