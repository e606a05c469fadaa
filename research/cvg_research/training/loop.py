"""What the training loops share: a stage's resumable checkpoint, a loss log that a resumed stage rewinds,
the learning-rate schedule, the loss plot saved beside a trained model, and the one resumable chunk cache
(encoded latents, classifier readings)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cvg.io.files import atomic_path, remove_stale_temporaries, write_text_atomic


class Checkpoint:
    """A stage's resumable state (step, modules, optimiser) in one file, written atomically."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = path, every

    def load(self, **states) -> int:
        if not self.path.is_file():
            return 0
        saved = torch.load(self.path, weights_only=True)
        for name, obj in states.items():
            obj.load_state_dict(saved[name])
        return saved["step"]

    def save(self, step: int, done: bool = False, **states) -> None:
        if done or step % self.every == 0:
            with atomic_path(self.path) as tmp:
                torch.save({"step": step, **{k: v.state_dict() for k, v in states.items()}}, tmp)


class LossLog:
    """Loss log (JSON lines) that a resumed stage rewinds to its checkpoint."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def rewind(self, step: int) -> None:
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        rows = [json.loads(line) for line in lines]
        kept = [r for r in rows if r["stage"] != self.stage or r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, **values: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": self.stage, "step": step, **values}) + "\n")


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def plot_losses(log: Path, out: Path, width: int = 640, height: int = 240) -> None:
    """Training losses per stage (log10, raw and smoothed, one panel each) as a PNG."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    stages = [s for s in ("vae", "transformer") if any(r["stage"] == s for r in rows)]
    image = Image.new("RGB", (width, height * len(stages)), "white")
    draw = ImageDraw.Draw(image)
    for panel, stage in enumerate(stages):
        steps = np.array([r["step"] for r in rows if r["stage"] == stage], float)
        loss = np.log10(np.array([r["loss"] for r in rows if r["stage"] == stage], float))
        window = max(1, len(loss) // 100)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        box = (50, panel * height + 20, width - 20, panel * height + height - 30)
        scale = _Scale(box, float(steps[-1]), float(loss.min()), float(loss.max()))
        draw.rectangle(box, outline="black")
        draw.line(scale(steps, loss), fill=(190, 190, 230))
        draw.line(scale(steps[window - 1 :], smooth), fill=(30, 30, 160), width=2)
        draw.text((box[0], box[1] - 16), f"{stage}: log10 loss vs step (0..{int(steps[-1])})", fill="black")
        draw.text((4, box[1]), f"{scale.hi:.2f}", fill="black")
        draw.text((4, box[3] - 10), f"{scale.lo:.2f}", fill="black")
    with atomic_path(out) as tmp:
        image.save(tmp)


@dataclass(frozen=True)
class _Scale:
    """Data (step, value) to pixel coordinates inside a box."""

    box: tuple[int, int, int, int]
    last_step: float
    lo: float
    hi: float

    def __call__(self, steps: np.ndarray, values: np.ndarray) -> list[tuple[float, float]]:
        left, top, right, bottom = self.box
        xs = left + (right - left) * steps / self.last_step
        ys = top + (bottom - top) * (self.hi - values) / max(self.hi - self.lo, 1e-9)
        return list(zip(xs.tolist(), ys.tolist(), strict=True))


def cached_chunks(
    items: Iterable,
    work: Path,
    chunk: int,
    describe: Callable[[list], dict],
    read: Callable[[list], dict],
    report: Callable[[str], None],
) -> list[dict]:
    """`read(batch)` of each `chunk` items, cached as WORK/000000.pt...; a cached chunk is reused only when
    `describe(batch)` (which clips it holds) matches what it recorded."""
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work, "*.pt")  # a killed trainer's; callers hold the output's lock
    parts, batch, index = [], [], 0
    start = time.perf_counter()

    def flush():
        path, which = work / f"{index:06d}.pt", describe(batch)
        record = torch.load(path, weights_only=True) if path.is_file() else None
        if record is None or any(record.get(k) != v for k, v in which.items()):  # other clips or readers
            record = {**read(batch), **which}
            with atomic_path(path) as tmp:
                torch.save(record, tmp)
            report(f"read {index + len(batch)} clips ({time.perf_counter() - start:.0f} s)")
        parts.append(record)

    for item in items:
        batch.append(item)
        if len(batch) == chunk:
            flush()
            index, batch = index + chunk, []
    if batch:
        flush()
    return parts
