"""Step caches on the later steps (`CVGPipeline(cache=...)`): diffusers' FirstBlockCache at two thresholds
against no cache, on the shipped generator and classifier at 64x64x17, 20 steps, CFG 5, guided at the
defaults, clip by clip in turn (same prompts, same seeds): seconds per clip, the CompShapes judge's verdicts
and the largest pixel change against the uncached clip.

    python benchmarks/step_cache.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import FirstBlockCacheConfig

from cvg.compshapes.dataset import split_clip
from cvg.compshapes.grammar import CATEGORIES
from cvg.compshapes.judge import judge
from cvg.experiments.report import machine_line, publish
from cvg.io.video import to_uint8
from cvg.pipeline import CVGPipeline

MODELS = Path(__file__).resolve().parent.parent / "models"
THRESHOLDS = (None, 0.05, 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=24, help="held-out prompts, categories in turn (default 24)")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    args = parser.parse_args()
    base = CVGPipeline.from_pretrained(MODELS / "compshapes-wan")
    base.load_classifier(MODELS / "compshapes-classifier")
    base.pipe.set_progress_bar_config(disable=True)
    pipes = {
        t: CVGPipeline(base.pipe, base.objective, cache=None if t is None else FirstBlockCacheConfig(threshold=t))
        for t in THRESHOLDS
    }
    seconds = {t: [] for t in THRESHOLDS}
    right = dict.fromkeys(THRESHOLDS, 0)
    change = dict.fromkeys(THRESHOLDS, 0)
    for i in range(args.clips + 1):  # clip 0 warms up
        clip = split_clip(20_261_124, i, CATEGORIES[i % len(CATEGORIES)], "heldout")
        frames = {}
        for t, pipe in pipes.items():
            start = time.perf_counter()
            out = pipe(
                clip.prompt,
                clip.composition,
                height=64,
                width=64,
                num_frames=17,
                num_inference_steps=20,
                generator=torch.Generator().manual_seed(i),
            )
            frames[t] = to_uint8(out.frames[0])
            if i:
                seconds[t].append(time.perf_counter() - start)
                right[t] += judge(frames[t], clip.composition).ok
        if i:
            for t in THRESHOLDS:
                change[t] = max(change[t], int(abs(frames[t].astype(int) - frames[None].astype(int)).max()))
    uncached = statistics.median(seconds[None])
    lines = [
        f"Step caches on the later steps, {machine_line()}: the shipped generator and classifier, 64x64x17, "
        f"20 steps, CFG 5, guided at the defaults (4 steps; the cache serves steps 4-19); medians of "
        f"{args.clips} held-out prompts, each variant in turn.",
        "",
        "| cache | s per clip | / no cache | judged right | largest pixel change (0-255) |",
        "|---|---|---|---|---|",
    ]
    for t in THRESHOLDS:
        name = "none" if t is None else f"FirstBlockCache, threshold {t:g}"
        median = statistics.median(seconds[t])
        lines.append(f"| {name} | {median:.2f} | {median / uncached:.2f} | {right[t]}/{args.clips} | {change[t]} |")
    publish("Command: `python benchmarks/step_cache.py`\n\n" + "\n".join(lines), args.write, "step_cache")


if __name__ == "__main__":
    main()
