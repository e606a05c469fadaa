"""Quality scores that need no outside model: a CompShapes Fréchet distance and artefact rates.

The Fréchet distance compares feature statistics of two clip sets in the space of `ClipEncoder`, the
encoder half of a small frame autoencoder that `train_encoder` trains on training-split renders to redraw
each frame from its code. It learns no composition label (no colour, shape, count, relation or motion
target), so a clip that fixes its composition is not scored closer for that alone. The shipped weights
(`assets/encoder`) come from `cvg train-encoder` with its defaults (seed 0).
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

from cvg.io.files import atomic_path, write_text_atomic
from cvg_research.compshapes.dataset import split_clip
from cvg_research.compshapes.grammar import ALL_CATEGORIES
from cvg_research.compshapes.judge import detect
from cvg_research.compshapes.world import BACKGROUND, COLOURS, render

DEFAULT_ENCODER = Path(__file__).parent / "assets" / "encoder"


class ClipEncoder(nn.Module):
    """uint8 clips `[B, F, H, W, 3]` (64x64 frames) -> features `[B, 2 * width]`: per-frame codes averaged
    over the clip, and their change from the first frame to the last."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.width = width
        self.frames = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, width),
        )
        self.decoder = nn.Sequential(  # trained with the encoder, unused by `features`
            nn.Linear(width, 32 * 8 * 8),
            nn.Unflatten(1, (32, 8, 8)),
            nn.GELU(),
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1),
        )

    @staticmethod
    def _pixels(clips: torch.Tensor) -> torch.Tensor:
        return clips.float().div(127.5).sub(1.0).flatten(0, 1).permute(0, 3, 1, 2)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        batch, frames = clips.shape[:2]
        per_frame = self.frames(self._pixels(clips)).view(batch, frames, -1)
        return torch.cat([per_frame.mean(1), per_frame[:, -1] - per_frame[:, 0]], dim=1)

    def reconstruction_loss(self, clips: torch.Tensor, object_weight: float = 10.0) -> torch.Tensor:
        """Mean squared error of the redrawn frames, object pixels weighted up (they are a few percent)."""
        x = self._pixels(clips)
        background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1
        weight = 1 + (object_weight - 1) * ((x - background).abs().amax(1, keepdim=True) > 0.05).float()
        return (weight * (self.decoder(self.frames(x)) - x) ** 2).mean()


def train_encoder(out: str | os.PathLike, clips: int = 1600, epochs: int = 6, seed: int = 0) -> dict:
    """Train `ClipEncoder` as an autoencoder on `clips` training-split renders (deterministic by seed); save
    it to `out`; return the log."""
    torch.manual_seed(seed)
    data = [split_clip(seed * 7919, i, ALL_CATEGORIES[i % len(ALL_CATEGORIES)], "train") for i in range(clips)]
    frames = torch.from_numpy(np.stack([render(c.scene) for c in data]))
    model = ClipEncoder()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    log = []
    for epoch in range(epochs):
        order = torch.randperm(clips)
        total = 0.0
        for start in range(0, clips, 32):
            idx = order[start : start + 32]
            loss = model.reconstruction_loss(frames[idx])
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
