"""Quality scores that need no outside model: a CompShapes Fréchet distance and artefact rates.

The Fréchet distance compares feature statistics of two clip sets in the space of `ClipEncoder`, a small
network trained by `train_encoder` on renders to say which colours and shapes are in a clip, how many
objects there are and which way they move. The shipped weights (`assets/encoder`) come from
`cvg train-encoder` with its defaults (seed 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import linalg
from torch import nn

from cvg.compshapes.grammar import CATEGORIES, sample_clip
from cvg.compshapes.judge import detect
from cvg.compshapes.world import BACKGROUND, COLOURS, MOTIONS, SHAPES, render
from cvg.io.files import atomic_path, write_text_atomic

DEFAULT_ENCODER = Path(__file__).parent / "assets" / "encoder"
_MOTIONS = list(MOTIONS)


class ClipEncoder(nn.Module):
    """uint8 clips `[B, F, H, W, 3]` -> features `[B, 2 * width]` (mean and change over frames)."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.width = width
        self.frames = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * width, width),
        )
        self.heads = nn.Linear(2 * width, len(COLOURS) + len(SHAPES) + len(_MOTIONS) + 3)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        batch, frames = clips.shape[:2]
        x = clips.float().div(127.5).sub(1.0).flatten(0, 1).permute(0, 3, 1, 2)
        per_frame = self.frames(x).view(batch, frames, -1)
        return torch.cat([per_frame.mean(1), per_frame[:, -1] - per_frame[:, 0]], dim=1)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(clips))


def _targets(scene) -> tuple[np.ndarray, int, int]:
    present = np.zeros(len(COLOURS) + len(SHAPES), np.float32)
    for thing in scene.things:
        present[list(COLOURS).index(thing.colour)] = 1
        present[len(COLOURS) + SHAPES.index(thing.shape)] = 1
    return present, _MOTIONS.index(scene.things[0].motion), len(scene.things) - 1


def train_encoder(out: str | os.PathLike, clips: int = 1600, epochs: int = 6, seed: int = 0) -> dict:
    """Train `ClipEncoder` on `clips` renders (deterministic by seed); save it to `out`; return the log."""
    torch.manual_seed(seed)
    data = [sample_clip(seed * 7919 + i, CATEGORIES[i % len(CATEGORIES)]) for i in range(clips)]
    frames = torch.from_numpy(np.stack([render(c.scene) for c in data]))
    presence, motion, count = zip(*(_targets(c.scene) for c in data), strict=True)
    presence, motion, count = torch.from_numpy(np.stack(presence)), torch.tensor(motion), torch.tensor(count)
    model = ClipEncoder()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    bce, ce = nn.BCEWithLogitsLoss(), nn.CrossEntropyLoss()
    split = len(COLOURS) + len(SHAPES)
    log = []
    for epoch in range(epochs):
        order = torch.randperm(clips)
        total = 0.0
        for start in range(0, clips, 32):
            idx = order[start : start + 32]
            logits = model(frames[idx])
            loss = (
                bce(logits[:, :split], presence[idx])
                + ce(logits[:, split : split + len(_MOTIONS)], motion[idx])
                + ce(logits[:, split + len(_MOTIONS) :], count[idx])
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        log.append({"epoch": epoch, "loss": total / clips})
    config = {"width": model.width, "seed": seed, "clips": clips, "epochs": epochs, "log": log}
    write_text_atomic(Path(out) / "config.json", json.dumps(config, indent=1))
    with atomic_path(Path(out) / "model.safetensors") as tmp:
        save_file(model.state_dict(), str(tmp))
    return config


def load_encoder(directory: str | os.PathLike = DEFAULT_ENCODER) -> ClipEncoder:
    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no clip encoder in {directory}; train one with `cvg train-encoder`")
    config = json.loads((directory / "config.json").read_text())
    model = ClipEncoder(config["width"])
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


@torch.no_grad()
def clip_features(encoder: ClipEncoder, clips: list[np.ndarray], batch: int = 64) -> np.ndarray:
    return np.concatenate(
        [
            encoder.features(torch.from_numpy(np.stack(clips[i : i + batch]))).double().numpy()
            for i in range(0, len(clips), batch)
        ]
    )


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets `[n, d]`."""
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def artefact_counts(frames: np.ndarray, detections: list | None = None) -> np.ndarray:
    """`[empty frames, frames, off-palette foreground pixels, foreground pixels]` of one clip, to sum over a
    set; `detections` (one list per frame) saves detecting again."""
    detections = [detect(f) for f in frames] if detections is None else detections
    background = np.asarray(BACKGROUND, np.float32)
    pixels = frames.reshape(-1, 3).astype(np.float32) - background
    pixels = pixels[np.linalg.norm(pixels, axis=1) > 40]  # foreground
    towards = np.asarray(list(COLOURS.values()), np.float32) - background  # [colours, 3]
    t = np.clip(pixels @ towards.T / (towards**2).sum(1), 0.0, 1.0)  # position along each blend line
    off_line = np.linalg.norm(pixels[:, None] - t[..., None] * towards, axis=2).min(1) if len(pixels) else pixels
    return np.array([sum(not d for d in detections), len(frames), (off_line > 40).sum(), len(pixels)], np.float64)


def artefact_rates(counts: np.ndarray | list[np.ndarray]) -> dict[str, float]:
    """Fraction of frames with no detectable object, and of foreground pixels that are no blend of the
    background with a single palette colour (colour bleeding: mixed or washed-out colours). Takes clips
    (`[F, H, W, 3]` arrays) or summed `artefact_counts`."""
    if isinstance(counts, list):
        counts = sum(artefact_counts(clip) for clip in counts)
    empty, frames, bleeding, foreground = counts
    return {"empty_frames": empty / frames, "colour_bleeding": bleeding / foreground if foreground else 0.0}
