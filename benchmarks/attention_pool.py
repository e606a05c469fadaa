"""CPU benchmark of attention_pool: time and peak memory of naive, torch, and plain SDPA (no maps).

    python benchmarks/attention_pool.py [--quick] [--write benchmarks/RESULTS.md]

Times: per pass, one process runs every backend in turn for `--repeats` rounds after a warm-up and
reports medians. Memory: each (backend, pass) in its own fresh process (see cvg.measure), the peak
above the inputs of one run after a warm-up. Ratios compare backends of the same invocation, since
this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cvg import attention_pool
from cvg.io.files import write_text_atomic
from cvg.measure import ISOLATED_ENV, json_child, machine_line, peak_extra_bytes, write_section

FULL = dict(B=1, H=12, N=16384, M=512, D=64, T=8)
QUICK = dict(B=1, H=12, N=4096, M=512, D=64, T=8)
COMPARED = ("sdpa", "naive", "torch")
PASSES = ("fwd", "fwdbwd")


def make_work(backend: str, mode: str, B: int, H: int, N: int, M: int, D: int, T: int, dtype: str = "float32"):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(getattr(torch, dtype)).requires_grad_() for n in (N, M, M))
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
        grads = [g.to(o.dtype) for o, g in zip(outputs, (dout, dpooled)[: len(outputs)], strict=True)]
        return torch.autograd.grad(outputs, (q, k, v), grads)

    return work


def measure_memory(backend: str, mode: str, size: dict) -> dict:
    """Peak memory above the inputs; meaningful only in a process started with ISOLATED_ENV."""
    work = make_work(backend, mode, **size)
    work()  # warm-up: thread pools, lazy initialisation
    return dict(peak_bytes=peak_extra_bytes(work)[1])


def measure_times(mode: str, size: dict, repeats: int) -> dict[str, list[float]]:
    """Every backend in turn, `repeats` rounds, so slow phases of a shared machine hit all of them alike."""
    works = {backend: make_work(backend, mode, **size) for backend in COMPARED}
    times = {backend: [] for backend in COMPARED}
    for work in works.values():
        work()  # warm-up
    for _ in range(repeats):
        for backend, work in works.items():
            start = time.perf_counter()
            work()
            times[backend].append(time.perf_counter() - start)
    return times


def _child(args: list[str], env: dict) -> dict:
    return json_child([__file__, *args], env, f"benchmark child {args[:3]}")


def measure(size: dict, repeats: int) -> list[dict]:
    """Times with the default allocator; memory per backend in its own process with ISOLATED_ENV (its
    mmap-per-buffer setting makes peak memory exact but slows allocation-heavy code)."""
    results = []
    for mode in PASSES:
        times = _child(["--times", mode, "--size", json.dumps(size), "--repeats", str(repeats)], {})
        for backend in COMPARED:
            memory = _child(["--memory", backend, mode, "--size", json.dumps(size)], ISOLATED_ENV)
            ts = times[backend]
            results.append(dict(backend=backend, mode=mode, median_s=statistics.median(ts), times_s=ts, **memory))
            print(f"measured {backend:>5} {mode:<6} {results[-1]['median_s']:.3f} s", file=sys.stderr)
    return results


def table(results: list[dict], size: dict) -> str:
    by = {(r["backend"], r["mode"]): r for r in results}
    lines = [
        f"attention_pool, {machine_line()}, " + ", ".join(f"{k}={v}" for k, v in size.items()),
        "",
        "| backend | pass | median time (s) | peak extra memory (MiB) | time / sdpa | time / naive | memory / naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in PASSES:
        for backend in COMPARED:
            r = by[(backend, mode)]
            t, m = r["median_s"], r["peak_bytes"]
            sdpa, naive = by[("sdpa", mode)], by[("naive", mode)]
            lines.append(
                f"| {backend} | {mode} | {t:.3f} | {m / 2**20:.1f} | {t / sdpa['median_s']:.2f} | "
                f"{t / naive['median_s']:.2f} | {m / naive['peak_bytes']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller size {QUICK} (the demo)")
    parser.add_argument("--size", help="JSON dict of B, H, N, M, D, T")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of q, k, v")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    parser.add_argument("--json", type=Path, help="write raw results as JSON")
    parser.add_argument("--times", metavar="PASS", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=2, metavar=("BACKEND", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = json.loads(args.size) if args.size else {**(QUICK if args.quick else FULL)}
    if args.dtype != "float32":  # rides with the size to the child processes
        size["dtype"] = args.dtype
    if args.times:
        print(json.dumps(measure_times(args.times, size, args.repeats)))
        return
    if args.memory:
        print(json.dumps(measure_memory(*args.memory, size)))
        return
    results = measure(size, args.repeats)
    text = table(results, size)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(size=size, results=results), indent=1))
    if args.write:
        dtype = size.get("dtype", "float32")
        plain = dtype == "float32"
        section, flag = ("attention_pool", "") if plain else (f"attention_pool_{dtype}", f" --dtype {dtype}")
        write_section(args.write, section, f"Command: `python benchmarks/attention_pool.py{flag}`\n\n{text}")


if __name__ == "__main__":
    main()
