"""Step caches on the later steps (`CVGPipeline(cache=...)`): diffusers' FirstBlockCache at two thresholds
against no cache, on the shipped generator and classifier at 64x64x17, 20 steps, CFG 5, guided at the
defaults, clip by clip in turn (same prompts, same seeds): seconds per clip, the CompShapes judge's verdicts
and the largest pixel change against the uncached clip.

    python benchmarks/step_cache.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import statistics

from diffusers import FirstBlockCacheConfig
from shipped import MODELS, held_out, parser, timed

from cvg.compshapes.judge import judge
from cvg.experiments.report import machine_line, publish
from cvg.io.video import to_uint8
from cvg.pipeline import CVGPipeline

THRESHOLDS = (None, 0.05, 0.1)


def main() -> None:
    args = parser(__doc__, clips=24).parse_args()
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
    for i, clip in held_out(args.clips):
        frames = {}
        for t, pipe in pipes.items():
            elapsed, out = timed(pipe, clip, i)
            frames[t] = to_uint8(out.frames[0])
            if i:
                seconds[t].append(elapsed)
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
