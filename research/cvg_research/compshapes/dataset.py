"""CompShapes datasets on disk, in the format cvg reads for any video set with known compositions.

    DIR/index.jsonl          one JSON record per clip: file, prompt, composition, counterfactuals, and
                             for rendered clips category, seed and scene
    DIR/clips/000000.npz     frames: uint8 [F, H, W, 3]

Writing is atomic per clip (temporary file, then rename; the index line only after its clip exists) and
resumable: clips already in the index are not written again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from cvg.io.files import LockedError, atomic_path, locked, read_json_object, remove_stale_temporaries, write_text_atomic
from cvg_research.compshapes.grammar import CATEGORIES, SPLITS, Clip, sample_clip, split_of
from cvg_research.compshapes.world import render

INDEX = "index.jsonl"


def clip_seed(seed: int, index: int) -> int:
    """The seed of clip `index` of a dataset with base `seed`: independent streams per clip."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def split_clip(seed: int, index: int, category: str, split: str = "all", **size) -> Clip:
    """Clip `index` of a set with base `seed`, drawn again (fresh streams) until its prompt is in `split`
    (`grammar.split_of`: "train", "dev" or "test") with a counterfactual of the same split; "all" takes the
    first draw."""
    if split not in ("all", *SPLITS):
        raise ValueError(f"split must be one of all, {', '.join(SPLITS)}, got {split!r}")
    for attempt in range(1000):
        clip_rng = clip_seed(seed, index) if attempt == 0 else clip_seed(seed, index * 1000 + attempt)
        clip = sample_clip(clip_rng, category, **size)
        if split == "all" or (split_of(clip.prompt) == split and clip.counterfactuals):
            return clip
    raise RuntimeError(f"no {split} prompt in 1000 draws of category {category!r}")


class DatasetError(ValueError):
    """A dataset directory that cannot be read or written as asked (one-line message naming the problem)."""


def read_index(location: str | os.PathLike) -> list[dict]:
    """Records of a dataset directory (or of an index file). Only a torn last line (an interrupted write: no
    newline after it) is dropped; any other line that is not a JSON record is an error naming it."""
    path = Path(location)
    path = path / INDEX if path.is_dir() else path
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the last line, without its newline: a write cut short
                break
            raise DatasetError(
                f"{path}:{number}: not a JSON record ({e.msg}); mend or remove that line "
                f"(no record after it is dropped)"
            ) from None
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{number}: a record must be a JSON object, not {type(record).__name__}")
        _check_fields(record, f"{path}:{number}")
        if "id" in record and record["id"] in seen:
            raise DatasetError(f"{path}:{number}: id {record['id']} is listed twice; each record needs its own")
        seen.add(record.get("id"))
        records.append(record)
    return records


# The fields records may carry, and what each must be (a bool is not an integer here).
FIELD_TYPES = {"id": int, "prompt": str, "file": str, "category": str, "scene": dict, "composition": dict}


def _check_fields(record: dict, where: str) -> None:
    for key, kind in FIELD_TYPES.items():
        value = record.get(key)
        if key in record and (not isinstance(value, kind) or isinstance(value, bool)):
            raise DatasetError(f"{where}: {key} must be a JSON {_JSON_NAMES[kind]}, got {str(value)[:40]!r}")


_JSON_NAMES = {int: "integer", str: "string", dict: "object"}


def required(record: dict, location: str | os.PathLike, *keys: str) -> None:
    """A record must carry `keys` for this use (a spec set's `prompt`, an evaluated set's `file`, ...)."""
    if missing := [k for k in keys if k not in record]:
        raise DatasetError(f"{location}: record {record.get('id', '?')} has no {', '.join(missing)}")


def write_index(directory: str | os.PathLike, records: list[dict]) -> None:
    """Replace a dataset directory's index with `records`, atomically."""
    write_text_atomic(Path(directory) / INDEX, "".join(json.dumps(r) + "\n" for r in records))


def read_frames(directory: str | os.PathLike, record: dict) -> np.ndarray:
    required(record, directory, "file")
    path = Path(directory) / record["file"]
    if not path.is_file():
        raise DatasetError(f"{directory}: record {record.get('id', '?')} names {record['file']}, which is missing")
    with np.load(path) as data:
        return data["frames"]


PARAMS = "dataset.json"  # what the set was written with: a resume must ask for the same
LOCK = ".lock"


class ClipWriter:
    """Adds clips to a dataset directory: each clip file written atomically, its index line only after it.

    Entering it takes the directory's lock (a second writer is refused, not interleaved), checks that
    `params` (seed, size, ... of the set) are the ones it was started with, drops a torn last index line and
    records whose clip file is missing (written again) and a killed writer's temporary files, and fills
    `done` with the ids already there.
    """

    def __init__(self, directory: str | os.PathLike, params: dict | None = None):
        self.directory, self.params = Path(directory), params

    def __enter__(self) -> ClipWriter:
        (self.directory / "clips").mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(locked(self.directory / LOCK, wait=False))
        except LockedError as e:
            raise DatasetError(
                f"{self.directory} is being written by another process (pid {e.holder}); wait for it or write elsewhere"
            ) from None
        try:
            self._check_params()
            records = read_index(self.directory)
            if malformed := [r for r in records if not {"id", "file"} <= r.keys()]:
                raise DatasetError(f"{self.directory / INDEX}: a record lacks its id or file: {malformed[0]}")
            records = [r for r in records if (self.directory / r["file"]).is_file()]
            remove_stale_temporaries(self.directory / "clips")  # a killed writer's; the lock is ours
            write_index(self.directory, records)
        except BaseException:
            self._stack.close()
            raise
        self.done = {r["id"] for r in records}
        self._index = open(self.directory / INDEX, "a")
        return self

    def _check_params(self) -> None:
        if self.params is None:
            return
        params = json.loads(json.dumps(self.params, default=str))  # as stored: tuples become lists
        path = self.directory / PARAMS
        if path.is_file():
            stored = read_json_object(path)
            if differs := sorted(k for k in {*stored, *params} if stored.get(k) != params.get(k)):
                detail = ", ".join(f"{k}={stored.get(k)!r} (asked {params.get(k)!r})" for k in differs)
                raise DatasetError(
                    f"{self.directory} was written with {detail}; resume with the same settings or write elsewhere"
                )
        else:
            write_text_atomic(path, json.dumps(params, indent=1))

    def __exit__(self, *exc) -> None:
        self._index.close()
        self._stack.close()  # releases the lock (as a killed process's is released)

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
    `split` restricts prompts to one sealed split (see `grammar.split_of`)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    written = 0
    size = {"frames": frames, "height": height, "width": width}
    params = {
        "seed": seed,
        "categories": list(categories),
        "frames": frames,
        "height": height,
        "width": width,
        "split": split,
    }
    with ClipWriter(directory, params) as writer:
        for i in range(count):
            if i not in writer.done:
                clip = split_clip(seed, i, categories[i % len(categories)], split, **size)
                writer.add(i, render(clip.scene), clip.to_record())
                written += 1
    return written
