"""Writing generated frames (mp4, gif, png frames) and pictures of pooled maps; every write is atomic."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cvg.io.files import atomic_path, check_writable
from cvg.io.native import native

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


FRAME_FILE = re.compile(r"frame_\d{4}\.png")


def check_output(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output `save_frames` would not write safely: what `check_writable`
    refuses (links, pipes, ...), a folder where a video goes, a video suffix other than .mp4/.gif, or a
    frames folder that holds anything but the regular frame files of an earlier write."""
    path = check_writable(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        if path.is_dir():
            raise ValueError(f"output {path} is a directory, not a {suffix} file")
        return path
    if path.is_file():
        raise ValueError(f"output {path} is a file; give .mp4, .gif, or a folder for PNG frames")
    if suffix and not path.exists():
        raise ValueError(f"output {path}: unknown video format {suffix!r} (use .mp4, .gif, or a folder name)")
    if path.is_dir() and (others := [p.name for p in path.iterdir() if not _earlier_frame(p)]):
        raise ValueError(
            f"output folder {path} is not empty ({others[0]!r} and {len(others) - 1} more are not "
            f"frames of an earlier run); give a new or empty folder"
        )
    return path


def _earlier_frame(entry: Path) -> bool:
    """A frame file an earlier write left: named as one, a regular file, not a link."""
    return bool(FRAME_FILE.fullmatch(entry.name)) and entry.is_file() and not entry.is_symlink()


def check_separate(outputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse outputs (by flag) that name one place, through links too, or one inside another's folder."""
    given = [(flag, Path(path).resolve()) for flag, path in outputs.items() if path is not None]
    for i, (flag, place) in enumerate(given):
        for other, there in given[i + 1 :]:
            if place == there or place in there.parents or there in place.parents:
                raise ValueError(f"{flag} and {other} name the same place ({there}); give each output its own path")


def save_frames(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write `[F, H, W, 3]` frames to `.mp4`, `.gif`, or (a path without suffix) a folder of PNG frames.

    A frames folder may be new, empty, or hold only the frames of an earlier write (replaced as a whole);
    any other content is refused (`check_output`), so no file of the user's is ever removed."""
    path = check_output(path)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
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
    try:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp_dir / f"frame_{i:04d}.png")
        if path.exists():  # only earlier frames (checked above): set them aside, then drop them
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp_dir, path)
            for frame in (old / path.name).iterdir():
                frame.unlink()
            (old / path.name).rmdir()
            old.rmdir()
        else:
            os.replace(tmp_dir, path)
    finally:
        if tmp_dir.exists():
            for frame in tmp_dir.iterdir():
                frame.unlink()
            tmp_dir.rmdir()
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
