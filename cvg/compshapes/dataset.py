"""CompShapes datasets on disk, in the format cvg reads for any video set with known compositions.

    DIR/index.jsonl          one JSON record per clip: file, prompt, composition, counterfactuals, and
                             for rendered clips category, seed and scene
    DIR/clips/000000.npz     frames: uint8 [F, H, W, 3]

Writing is atomic per clip (temporary file, then rename; the index line only after its clip exists) and
resumable: clips already in the index are not written again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cvg.compshapes.grammar import CATEGORIES, Clip, held_out, sample_clip
from cvg.compshapes.world import render
from cvg.files import atomic_path, write_text_atomic

INDEX = "index.jsonl"


def clip_seed(seed: int, index: int) -> int:
    """The seed of clip `index` of a dataset with base `seed`: independent streams per clip."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


SPLITS = ("all", "train", "heldout")


def split_clip(seed: int, index: int, category: str, split: str = "all", **size) -> Clip:
    """Clip `index` of a set with base `seed`, drawn again (fresh streams) until its prompt is in `split`:
    "train" never yields a held-out prompt, "heldout" only those, "all" takes the first draw."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for attempt in range(1000):
        clip_rng = clip_seed(seed, index) if attempt == 0 else clip_seed(seed, index * 1000 + attempt)
        clip = sample_clip(clip_rng, category, **size)
        if split == "all" or held_out(clip.prompt) == (split == "heldout"):
            return clip
    raise RuntimeError(f"no {split} prompt in 1000 draws of category {category!r}")


def read_index(location: str | os.PathLike) -> list[dict]:
    """Records of a dataset directory (or of an index file); a torn last line (an interrupted write) is ignored."""
    path = Path(location)
    path = path / INDEX if path.is_dir() else path
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def write_index(directory: str | os.PathLike, records: list[dict]) -> None:
    """Replace a dataset directory's index with `records`, atomically."""
    write_text_atomic(Path(directory) / INDEX, "".join(json.dumps(r) + "\n" for r in records))


def read_frames(directory: str | os.PathLike, record: dict) -> np.ndarray:
    with np.load(Path(directory) / record["file"]) as data:
        return data["frames"]


class ClipWriter:
    """Adds clips to a dataset directory: each clip file written atomically, its index line only after it.

    Opening it drops a torn last index line; `done` holds the ids already there, so callers resume.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        (self.directory / "clips").mkdir(parents=True, exist_ok=True)
        records = read_index(self.directory)
        write_index(self.directory, records)
        self.done = {r["id"] for r in records}

    def __enter__(self) -> ClipWriter:
        self._index = open(self.directory / INDEX, "a")
        return self

    def __exit__(self, *exc) -> None:
        self._index.close()

    def add(self, key: int, frames: np.ndarray, record: dict) -> None:
        name = f"clips/{key:06d}.npz"
        with atomic_path(self.directory / name) as tmp:
            np.savez_compressed(tmp, frames=frames)
        self._index.write(json.dumps({**record, "id": key, "file": name}) + "\n")
        self._index.flush()
        self.done.add(key)


def write_dataset(
    directory: str | os.PathLike,
    count: int,
    seed: int = 0,
    categories: tuple[str, ...] = CATEGORIES,
    frames: int = 17,
    height: int = 64,
    width: int = 64,
    split: str = "all",
) -> int:
    """Write clips `0..count-1` (categories in turn) that are not there yet; returns how many were written.
    `split` restricts prompts to the training or held-out part (see `grammar.held_out`)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    written = 0
    size = {"frames": frames, "height": height, "width": width}
    with ClipWriter(directory) as writer:
        for i in range(count):
            if i not in writer.done:
                clip = split_clip(seed, i, categories[i % len(categories)], split, **size)
                writer.add(i, render(clip.scene), clip.to_record())
                written += 1
    return written
