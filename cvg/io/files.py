"""Safe file writes: a reader never sees a half-written file, a failed write leaves nothing behind, two
processes never share a temporary name, and a cached artefact is used only if its content is the one written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers pick the same format; unique to this call, so
    concurrent writers never clash) that replaces `path` when the block succeeds and is removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named, not created (mkstemp would make it 0600): the writer creates it with the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LockedError(OSError):
    """Another process holds the lock `locked(wait=False)` asked for; `holder` is its pid as it wrote it."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by another process (pid {holder})")
        self.holder = holder


@contextmanager
def locked(path: str | os.PathLike, wait: bool = True) -> Iterator[IO[str]]:
    """Hold an exclusive lock on `path` (created; it holds the holder's pid) for the block. `wait=False`:
    LockedError at once if another process holds it. A killed holder's lock goes with it."""
    import fcntl

    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockedError(Path(path), Path(path).read_text().strip() or "?") from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield handle
    finally:
        handle.close()


_TEMPORARY = re.compile(r"\..+\.\d+-[0-9a-f]{12}\.tmp(\.\w+)?")  # atomic_path's names, and only them


def remove_stale_temporaries(directory: str | os.PathLike, name_glob: str = "*") -> None:
    """Delete the temporaries `atomic_path` left in `directory` for files matching `name_glob` when their
    writers were killed; call only while holding a lock that every writer there takes."""
    for stale in Path(directory).glob(f".{name_glob}.*.tmp*"):
        if _TEMPORARY.fullmatch(stale.name):
            stale.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work, a `path` that cannot be written: its nearest existing folder must be a
    writable directory and `path` itself, if it exists, a writable file (or folder), never a link, pipe,
    socket or device."""
    path = Path(path)
    if not str(path).strip():
        raise ValueError(f"{what} path is empty")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {parent} is not writable")
    if path.is_symlink():  # writing would replace the user's link, or reach through it
        raise ValueError(f"{what} {path} is a symbolic link; give the path it points to, or a new one")
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise ValueError(f"{what} {path} exists and is not a regular file (a pipe, socket or device?)")
    if path.is_file() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path} is not writable")
    return path


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def file_digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def record_digest(path: str | os.PathLike) -> None:
    """Record `path`'s SHA-256 beside it (`NAME.sha256`), after the file itself is in place."""
    path = Path(path)
    write_text_atomic(_digest_path(path), file_digest(path) + "\n")


def verified(path: str | os.PathLike) -> bool:
    """Whether `path` exists and its content is what `record_digest` recorded (no record: not verified)."""
    path, digest = Path(path), _digest_path(Path(path))
    if not (path.is_file() and digest.is_file()):
        return False
    return digest.read_text().strip() == file_digest(path)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from `path`, or a one-line error naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data
