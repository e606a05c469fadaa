"""Frame packing (float frames in [0, 1] -> uint8, the last step of every request): cvg._C vs numpy.

    python benchmarks/pack_frames.py --write benchmarks/RESULTS.md

Sizes: the CompShapes model's 17x64x64 clip and Wan's 81x480x832. Median of --repeats, same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from cvg.io.native import MISSING, native
from cvg.measure import machine_line, publish

SIZES = {"CompShapes 17x64x64": (17, 64, 64, 3), "Wan 81x480x832": (81, 480, 832, 3)}


def numpy_pack(frames: np.ndarray) -> np.ndarray:
    """`cvg.io.video.to_uint8`'s numpy path: the finiteness check, then the conversion."""
    if not np.isfinite(frames).all():
        raise ValueError("non-finite frames")
    return (np.clip(frames, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    args = parser.parse_args()
    if native is None:
        raise SystemExit(MISSING)
    lines = [
        f"Frame packing, {machine_line()}, median of {args.repeats}",
        "",
        "| size | numpy (ms) | cvg._C (ms) | numpy / cvg._C |",
        "|---|---|---|---|",
    ]
    for name, shape in SIZES.items():
        frames = np.random.default_rng(0).uniform(-0.1, 1.1, shape).astype(np.float32)
        out = np.empty(shape, np.uint8)
        slow = _median_seconds(lambda f=frames: numpy_pack(f), args.repeats)
        fast = _median_seconds(lambda f=frames, o=out: native.pack_frames(f, o), args.repeats)
        lines.append(f"| {name} | {slow * 1e3:.2f} | {fast * 1e3:.2f} | {slow / fast:.1f}x |")
    text = "\n".join(lines)
    publish(text, args.write, "pack_frames")


if __name__ == "__main__":
    main()
