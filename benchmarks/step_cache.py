"""Step caches on the later steps (`CVGPipeline(cache=...)`): diffusers' FirstBlockCache at two thresholds,
TaylorSeer at two refresh intervals and in its lite mode, and MagCache at two thresholds (its magnitude
ratios calibrated first on training-split prompts, as diffusers' calibration mode prints them) against no
cache, on the shipped generator and classifier at 64x64x17, 20 steps, CFG 5, guided at the defaults, clip
by clip in turn (same prompts, same seeds): seconds per clip, the CompShapes judge's verdicts and the largest
pixel change against the uncached clip.

    python benchmarks/step_cache.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import ast
import contextlib
import io
import statistics

import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from shipped import MODELS, SIZE, dev_clips, parser, timed

from cvg.io.video import to_uint8
from cvg.measure import machine_line, publish
from cvg.models.caching import WAN_TAYLORSEER_MODULES
from cvg.pipeline import CVGPipeline
from cvg_research.compshapes.dataset import split_clip
from cvg_research.compshapes.grammar import CATEGORIES
from cvg_research.compshapes.judge import judge

CALIBRATION_CLIPS = 4  # training-split prompts whose unguided steps give MagCache its magnitude ratios


def mag_ratios(base: CVGPipeline, served_steps: int) -> list[float]:
    """MagCache's ratios for the steps the cache serves: diffusers' calibration mode prints one list per
    forward context (conditional, unconditional) at the end of each generation; their mean over
    `CALIBRATION_CLIPS` training-split prompts."""
    pipe = CVGPipeline(
        base.pipe, base.objective, cache=MagCacheConfig(calibrate=True, num_inference_steps=served_steps)
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for i in range(CALIBRATION_CLIPS):
            timed(pipe, split_clip(20_261_205, i, CATEGORIES[i % len(CATEGORIES)], "train"), i)
    lists = [ast.literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[1.0")]
    if len(lists) != 2 * CALIBRATION_CLIPS:
        raise RuntimeError(f"MagCache calibration printed {len(lists)} ratio lists, not {2 * CALIBRATION_CLIPS}")
    return torch.tensor(lists).mean(0).tolist()


def caches(base: CVGPipeline, served_steps: int) -> dict[str, object]:
    ratios = mag_ratios(base, served_steps)
    return {
        "none": None,
        "FirstBlockCache, threshold 0.05": FirstBlockCacheConfig(threshold=0.05),
        "FirstBlockCache, threshold 0.1": FirstBlockCacheConfig(threshold=0.1),
        "TaylorSeer, refresh every 2 steps": TaylorSeerCacheConfig(
            cache_interval=2, cache_identifiers=WAN_TAYLORSEER_MODULES
        ),
        "TaylorSeer, refresh every 5 steps": TaylorSeerCacheConfig(
            cache_interval=5, cache_identifiers=WAN_TAYLORSEER_MODULES
        ),
        "TaylorSeer lite, refresh every 2 steps": TaylorSeerCacheConfig(cache_interval=2, use_lite_mode=True),
        "MagCache, threshold 0.06": MagCacheConfig(num_inference_steps=served_steps, mag_ratios=ratios),
        "MagCache, threshold 0.12": MagCacheConfig(threshold=0.12, num_inference_steps=served_steps, mag_ratios=ratios),
    }


def main() -> None:
    args = parser(__doc__, clips=24).parse_args()
    base = CVGPipeline.from_pretrained(MODELS / "compshapes-wan")
    base.load_classifier(MODELS / "compshapes-classifier")
    base.pipe.set_progress_bar_config(disable=True)
    guided = base.guidance.guide_steps
    configs = caches(base, SIZE["num_inference_steps"] - guided)
    pipes = {name: CVGPipeline(base.pipe, base.objective, cache=config) for name, config in configs.items()}
    seconds = {name: [] for name in pipes}
    right = dict.fromkeys(pipes, 0)
    change = dict.fromkeys(pipes, 0)
    for i, clip in dev_clips(args.clips):
        frames = {}
        for name, pipe in pipes.items():
            elapsed, out = timed(pipe, clip, i)
            frames[name] = to_uint8(out.frames[0])
            if i:
                seconds[name].append(elapsed)
                right[name] += judge(frames[name], clip.composition).ok
        if i:
            for name in pipes:
                change[name] = max(change[name], int(abs(frames[name].astype(int) - frames["none"].astype(int)).max()))
    uncached = statistics.median(seconds["none"])
    lines = [
        f"Step caches on the later steps, {machine_line()}: the shipped generator and classifier, 64x64x17, "
        f"20 steps, CFG 5, guided at the defaults ({guided} steps; the cache serves steps {guided}-"
        f"{SIZE['num_inference_steps'] - 1}); medians of {args.clips} held-out prompts, each variant in turn. "
        f"MagCache's ratios: diffusers' calibration on {CALIBRATION_CLIPS} training-split prompts, both CFG "
        "branches averaged. TaylorSeer predicts each block's attention and feed-forward outputs (lite: skips "
        "the blocks and predicts the output projection), its other settings at their defaults (the first 3 "
        "served steps computed, order 1).",
        "",
        "| cache | s per clip | / no cache | judged right | largest pixel change (0-255) |",
        "|---|---|---|---|---|",
    ]
    for name in pipes:
        median = statistics.median(seconds[name])
        lines.append(
            f"| {name} | {median:.2f} | {median / uncached:.2f} | {right[name]}/{args.clips} | {change[name]} |"
        )
    publish("Command: `python benchmarks/step_cache.py`\n\n" + "\n".join(lines), args.write, "step_cache")


if __name__ == "__main__":
    main()
