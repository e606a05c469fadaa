"""Batched classifier-free guidance: a step's conditional and unconditional forwards as one batch of two
(`CVGPipeline(batch_cfg=True)`) against two forwards, on the shipped generator at 64x64x17, 20 steps,
CFG 5, unguided, float32 and bf16, eager; every variant in turn per clip (same prompts, same seeds).

    python benchmarks/batched_cfg.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import statistics

import torch
from shipped import MODELS, dev_clips, parser, timed

from cvg.measure import machine_line, publish
from cvg.models.wan import load_wan_pipeline
from cvg.pipeline import CVGPipeline

DTYPES = ("float32", "bfloat16")


def main() -> None:
    args = parser(__doc__, clips=8).parse_args()
    pipes = {}
    for dtype in DTYPES:
        base = load_wan_pipeline(MODELS / "compshapes-wan", transformer_dtype=getattr(torch, dtype))
        base.set_progress_bar_config(disable=True)
        pipes.update({(dtype, batched): CVGPipeline(base, batch_cfg=batched) for batched in (False, True)})
    seconds: dict[tuple, list[float]] = {key: [] for key in pipes}
    differences: dict[str, float] = dict.fromkeys(DTYPES, 0.0)
    for i, clip in dev_clips(args.clips):
        frames = {}
        for key, pipe in pipes.items():
            elapsed, out = timed(pipe, clip, i, composition=False)
            if i:
                seconds[key].append(elapsed)
            frames[key] = torch.as_tensor(out.frames[0])
        for dtype in DTYPES:  # pixels in [0, 1]: how far batching moves the decoded video
            gap = (frames[dtype, True] - frames[dtype, False]).abs().max().item()
            differences[dtype] = max(differences[dtype], gap)
    median = {key: statistics.median(s) for key, s in seconds.items()}
    lines = [
        f"Batched against sequential classifier-free guidance, {machine_line()}: the shipped generator, "
        f"64x64x17, 20 steps, CFG 5, unguided, eager; medians of {args.clips} held-out prompts, each variant "
        "in turn.",
        "",
        "| transformer | two forwards (s per clip) | one batch of two (s per clip) | batched / two | "
        "max pixel difference |",
        "|---|---|---|---|---|",
    ]
    for dtype in DTYPES:
        two, one = median[dtype, False], median[dtype, True]
        lines.append(f"| {dtype} | {two:.3f} | {one:.3f} | {one / two:.2f} | {differences[dtype]:.1e} |")
    publish("Command: `python benchmarks/batched_cfg.py`\n\n" + "\n".join(lines), args.write, "batched_cfg")


if __name__ == "__main__":
    main()
