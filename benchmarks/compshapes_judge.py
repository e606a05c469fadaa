"""How the CompShapes judge degrades under blur and noise, per category.

    python benchmarks/compshapes_judge.py [--clips 400] [--write benchmarks/RESULTS.md]

Each clip is rendered, corrupted (Gaussian blur of the frames with sigma in pixels, then Gaussian pixel
noise with std in 0-255 units, clipped), and judged against its composition and its counterfactual.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from cvg.measure import write_section
from cvg_research.compshapes.grammar import CATEGORIES, sample_clip
from cvg_research.compshapes.judge import detect, judge_detections
from cvg_research.compshapes.world import render

CORRUPTIONS = [
    (0.0, 0.0),
    (0.7, 0.0),
    (1.2, 0.0),
    (2.0, 0.0),
    (0.0, 10.0),
    (0.0, 25.0),
    (0.0, 40.0),
    (1.2, 25.0),
    (2.0, 40.0),
]


def corrupt(frames: np.ndarray, blur: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    out = frames.astype(np.float32)
    if blur:
        out = ndimage.gaussian_filter(out, sigma=(0, blur, blur, 0))
    if noise:
        out = out + rng.normal(0.0, noise, out.shape)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=400, help="clips per corruption, categories in turn")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    args = parser.parse_args()
    header = "| blur sigma (px) | noise std | " + " | ".join(CATEGORIES) + " | counterfactuals rejected |"
    lines = [header, "|" + "---|" * (len(CATEGORIES) + 3)]
    for blur, noise in CORRUPTIONS:
        rng = np.random.default_rng(args.seed)
        right = {c: [0, 0] for c in CATEGORIES}
        rejected = 0
        for i in range(args.clips):
            category = CATEGORIES[i % len(CATEGORIES)]
            clip = sample_clip(args.seed * 1_000_003 + i, category)
            frames = corrupt(render(clip.scene), blur, noise, rng)
            detections, size = [detect(f) for f in frames], frames.shape[1:3]
            right[category][0] += judge_detections(detections, size, clip.composition).ok
            right[category][1] += 1
            rejected += not judge_detections(detections, size, clip.counterfactuals[0][1]).ok
        cells = " | ".join(f"{ok / n:.3f}" for ok, n in right.values())
        lines.append(f"| {blur} | {noise} | {cells} | {rejected / args.clips:.3f} |")
        print(lines[-1], flush=True)
    text = f"Judge accuracy on corrupted renders, {args.clips} clips per row (seed {args.seed}).\n\n" + "\n".join(lines)
    if args.write:
        write_section(args.write, "compshapes_judge", f"Command: `python benchmarks/compshapes_judge.py`\n\n{text}")


if __name__ == "__main__":
    main()
