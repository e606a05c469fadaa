"""Writing generated frames (mp4, gif, png frames) and pictures of pooled maps; every write is atomic."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cvg.files import atomic_path
from cvg.native import native

VIDEO_SUFFIXES = (".mp4", ".gif")
NON_FINITE = "frames contain non-finite values; nothing was written"


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (`[F, H, W, 3]`) -> uint8; refuses non-finite values."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [frames, height, width, 3], got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if native is not None and frames.dtype == np.float32:
        frames = np.ascontiguousarray(frames)
        packed = np.empty(frames.shape, np.uint8)
        if native.pack_frames(frames, packed):
            raise ValueError(NON_FINITE)
        return packed
    if not np.isfinite(frames).all():
        raise ValueError(NON_FINITE)
    return (np.clip(frames, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def save_frames(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write `[F, H, W, 3]` frames to `.mp4`, `.gif`, or (any other path) a folder of PNG frames."""
    path = Path(path)
    frames = to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        with atomic_path(path) as tmp:
            if path.suffix.lower() == ".mp4":
                import imageio.v2 as imageio

                imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=8)
            else:
                images = [Image.fromarray(f) for f in frames]
                images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_dir / f"frame_{i:04d}.png")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp_dir, path)
    return path


def _heat(values: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] -> [h, w, 3] black-red-yellow-white colour map."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def maps_picture(entity_maps: np.ndarray, frames: np.ndarray, names: list[str], min_cell: int = 128) -> Image.Image:
    """One row per entity, one column per pooled frame: the map over the matching video frame.

    `entity_maps` is `[F_pooled, h, w, E]` (attention mass), `frames` `[F, H, W, 3]` in [0, 1] or uint8.
    Each row is min-max normalised over the whole clip, so its frames compare with each other.
    """
    frames = to_uint8(frames)
    pooled_frames, _, _, entities = entity_maps.shape
    height, width = frames.shape[1:3]
    scale = max(1, int(np.ceil(min_cell / min(height, width))))
    cell_h, cell_w, label_w, title_h = height * scale, width * scale, 140, 20
    sheet = Image.new("RGB", (label_w + pooled_frames * cell_w, title_h + entities * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    picks = np.linspace(0, len(frames) - 1, pooled_frames).round().astype(int)
    for col, frame_index in enumerate(picks):
        draw.text((label_w + col * cell_w + 4, 4), f"frame {frame_index}", fill="black")
    for e in range(entities):
        clip = entity_maps[..., e]
        clip = (clip - clip.min()) / max(float(clip.max() - clip.min()), 1e-12)
        draw.text((4, title_h + e * cell_h + cell_h // 2 - 6), names[e][:20], fill="black")
        for col, frame_index in enumerate(picks):
            heat = Image.fromarray((_heat(clip[col]) * 255).astype(np.uint8)).resize((cell_w, cell_h), Image.BILINEAR)
            base = Image.fromarray(frames[frame_index]).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(Image.blend(base, heat, 0.6), (label_w + col * cell_w, title_h + e * cell_h))
    return sheet


def contact_sheet(rows: list[tuple[str, np.ndarray]], columns: int = 9, scale: int = 2) -> Image.Image:
    """One row per labelled clip (`[F, H, W, 3]` uint8 or [0, 1] floats), `columns` frames picked evenly across."""
    if not rows:
        raise ValueError("a contact sheet needs at least one clip")
    height, width = rows[0][1].shape[1:3]
    cell_h, cell_w, label_w = height * scale, width * scale, 170
    sheet = Image.new("RGB", (label_w + columns * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, frames) in enumerate(rows):
        frames = to_uint8(frames)
        draw.text((4, r * cell_h + cell_h // 2 - 6), label[:28], fill="black")
        for c, index in enumerate(np.linspace(0, len(frames) - 1, columns).round().astype(int)):
            cell = Image.fromarray(frames[index]).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(cell, (label_w + c * cell_w, r * cell_h))
    return sheet


def save_image(image: Image.Image, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
