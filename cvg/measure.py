"""What benchmarks and experiments share to measure and record: the machine line every table starts with,
marked Markdown sections replaced in place (benchmarks/RESULTS.md, docs), measurements taken in a child
process, and the peak resident memory of a piece of work on Linux (CPU runs have no allocator statistics).

For the peak, run the work in a fresh process started with `ISOLATED_ENV`: glibc then serves every large buffer
with its own mmap and returns it on free, so resident memory follows live tensors and the high-water
mark (reset through /proc/self/clear_refs) measures what the work itself held at its peak.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from cvg.hardware import bf16_units, cpu_model
from cvg.io.files import write_text_atomic

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
    call()
    start = time.perf_counter()
    out, peak = peak_extra_bytes(call)
    seconds = time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"{what}: non-finite output")
    return {"seconds": seconds, "peak_bytes": peak}


def machine_line() -> str:
    """The machine a table was measured on. bf16 speed depends on the CPU's matrix units (AMX tiles run
    bf16 matmuls several times faster than avx512_bf16 alone), so the model and those units are named."""
    cores = f"{os.cpu_count()} cores"
    return f"CPU ({cpu_model()}, {cores}, {bf16_units()}, torch {torch.__version__}, {platform.machine()})"


def publish(text: str, path: Path | None, name: str) -> None:
    """Print a results text and, with `path`, record it as the marked section `name` of that Markdown file."""
    print(text)
    if path is not None:
        write_section(path, name, text)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the marked section `name` of a Markdown file, atomically."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)


def json_child(argv: list[str], env: dict[str, str], what: str) -> dict:
    """Run `python argv...` with extra environment; its last stdout line is JSON. One-line error if it fails."""
    proc = subprocess.run([sys.executable, *argv], env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def clip_size(text: str) -> tuple[int, int, int]:
    """A `HEIGHTxWIDTHxFRAMES` command-line size as (frames, height, width)."""
    height, width, frames = (int(x) for x in text.split("x"))
    return frames, height, width
