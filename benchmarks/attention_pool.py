"""CPU benchmark of attention_pool: time and peak memory of naive, torch, and plain SDPA (no maps).

    python benchmarks/attention_pool.py [--quick] [--write benchmarks/RESULTS.md]

Every (backend, pass) is measured in its own fresh process (see cvg.memory): one warm-up, one run
for peak memory above the inputs, then the median of `--repeats` timed runs. Ratios compare
backends measured in the same invocation, since this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cvg import attention_pool
from cvg.memory import ISOLATED_ENV, peak_extra_bytes

FULL = dict(B=1, H=12, N=16384, M=512, D=64, T=8)
QUICK = dict(B=1, H=12, N=4096, M=512, D=64, T=8)
BACKENDS = ("sdpa", "naive", "torch")
PASSES = ("fwd", "fwdbwd")


def make_work(backend: str, mode: str, B: int, H: int, N: int, M: int, D: int, T: int):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, requires_grad=True) for n in (N, M, M))
    groups = torch.arange(N) // 64  # tiles of 64 video tokens
    tokens = torch.randperm(M, generator=gen)[:T]
    dout = torch.randn(B, H, N, D, generator=gen)
    dpooled = torch.randn(B, int(groups.max()) + 1, T, generator=gen)

    def forward():
        if backend == "sdpa":
            return (F.scaled_dot_product_attention(q, k, v),)
        return attention_pool(q, k, v, groups, tokens, backend=backend)

    def work():
        if mode == "fwd":
            with torch.no_grad():
                return forward()
        outputs = forward()
        return torch.autograd.grad(outputs, (q, k, v), (dout, dpooled)[: len(outputs)])

    return work


def measure_one(backend: str, mode: str, size: dict, repeats: int) -> dict:
    """Peak memory when started with ISOLATED_ENV, else the median time of `repeats` runs."""
    work = make_work(backend, mode, **size)
    work()  # warm-up: thread pools, lazy initialisation
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return dict(peak_bytes=peak_extra_bytes(work)[1])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return dict(median_s=statistics.median(times), times_s=times)


def measure_isolated(backend: str, mode: str, size: dict, repeats: int) -> dict:
    """Time and memory, each in a fresh process: the mmap-per-buffer malloc setting that makes peak memory
    exact also slows allocation-heavy code, so timings run with the default allocator."""
    cmd = [sys.executable, __file__, "--one", backend, mode, "--size", json.dumps(size), "--repeats", str(repeats)]
    result = dict(backend=backend, mode=mode)
    for env in ({}, ISOLATED_ENV):
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {backend} {mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def table(results: list[dict], size: dict) -> str:
    by = {(r["backend"], r["mode"]): r for r in results}
    lines = [
        f"attention_pool, CPU ({os.cpu_count()} cores, torch {torch.__version__}, {platform.machine()}), "
        + ", ".join(f"{k}={v}" for k, v in size.items()),
        "",
        "| backend | pass | median time (s) | peak extra memory (MiB) | time / sdpa | time / naive | memory / naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in PASSES:
        for backend in BACKENDS:
            r = by[(backend, mode)]
            t, m = r["median_s"], r["peak_bytes"]
            sdpa, naive = by[("sdpa", mode)], by[("naive", mode)]
            lines.append(
                f"| {backend} | {mode} | {t:.3f} | {m / 2**20:.1f} | {t / sdpa['median_s']:.2f} | "
                f"{t / naive['median_s']:.2f} | {m / naive['peak_bytes']:.3f} |"
            )
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the marked section `name` of a Markdown file, atomically."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller size {QUICK} (the demo)")
    parser.add_argument("--size", help="JSON dict of B, H, N, M, D, T")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    parser.add_argument("--json", type=Path, help="write raw results as JSON")
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = json.loads(args.size) if args.size else QUICK if args.quick else FULL
    if args.one:
        print(json.dumps(measure_one(*args.one, size, args.repeats)))
        return
    results = []
    for mode in PASSES:
        for backend in BACKENDS:
            results.append(measure_isolated(backend, mode, size, args.repeats))
            print(f"measured {backend:>5} {mode:<6} {results[-1]['median_s']:.3f} s", file=sys.stderr)
    text = table(results, size)
    print(text)
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(size=size, results=results), indent=1))
        os.replace(tmp, args.json)
    if args.write:
        write_section(args.write, "attention_pool", f"Command: `python benchmarks/attention_pool.py`\n\n{text}")


if __name__ == "__main__":
    main()
