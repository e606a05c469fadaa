"""What the benchmarks on the shipped CompShapes model share: its size, the dev-split prompts they time,
one timed call, and their command line."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from cvg_research.compshapes.dataset import split_clip
from cvg_research.compshapes.grammar import CATEGORIES, Clip

MODELS = Path(__file__).resolve().parent.parent / "models"
SIZE = {"height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 20}  # what the model was trained at


def parser(doc: str, clips: int) -> argparse.ArgumentParser:
    """--clips (timed dev-split prompts) and --write (the Markdown file that records the table)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=clips, help=f"timed clips per variant (default {clips})")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    return parser


def dev_clips(count: int) -> Iterator[tuple[int, Clip]]:
    """(i, clip) for a warm-up clip (i = 0, not to be timed) and `count` dev-split prompts, categories in turn."""
    for i in range(count + 1):
        yield i, split_clip(20_261_124, i, CATEGORIES[i % len(CATEGORIES)], "dev")


def timed(pipe, clip: Clip, seed: int, composition: bool = True, **call) -> tuple[float, object]:
    """(seconds, output) of one generation of `clip` at the model's size from the noise of `seed`."""
    start = time.perf_counter()
    out = pipe(
        clip.prompt,
        clip.composition if composition else None,
        **SIZE,
        **call,
        generator=torch.Generator().manual_seed(seed),
    )
    return time.perf_counter() - start, out
