"""One video job (`Job`) and its record, the file `<id>.job.json` that outlives the process: what it holds,
and how a record read back is checked before the queue takes it (`job_from`). A job's files are named by
its id alone (`OUTPUTS`), never by anything a record or a client says."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cvg.serving.runner import VideoJobRequest

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
RECORD = re.compile(r"([0-9a-f]{32})\.job\.json")
OUTPUTS = {  # a job's files, by kind
    "video": "{id}.mp4",
    "thumbnail": "{id}.thumbnail.png",  # the first frame
    "maps": "{id}.maps.png",
}
RECORDED = ("id", "status", "total", "created", "started", "finished", "error", "timings", "served_by", "attempts")


@dataclass
class Job:
    id: str
    request: VideoJobRequest
    status: str = "queued"
    step: int = 0  # denoising steps done
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # kind (OUTPUTS) -> what this job wrote
    served_by: str = ""
    attempts: int = 0  # runs started (a run a stopped server left unfinished counts)
    admitted: bool = False  # passed `JobQueue.admit` in this process (posted here); a restored job has not
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def record(self) -> dict:
        """What survives the process (`job_from` reads it back)."""
        return {
            **{k: getattr(self, k) for k in RECORDED},
            "request": asdict(self.request),
            "files": sorted(self.files),  # their kinds: the names follow from the id (OUTPUTS)
        }


def output_path(directory: Path, job_id: str, kind: str) -> Path:
    return directory / OUTPUTS[kind].format(id=job_id)


def record_path(directory: Path, job_id: str) -> Path:
    return directory / f"{job_id}.job.json"


def job_from(record: dict, job_id: str, directory: Path) -> Job:
    """The job of a record read from `{job_id}.job.json` in `directory`, checked: a record that names another
    id, or whose state does not hold together, is refused (ValueError), so its files are never taken for
    another job's and no later request trips on it."""
    if not isinstance(record, dict) or record.get("id") != job_id:
        found = record.get("id") if isinstance(record, dict) else record
        raise ValueError(f"the record names job {str(found)[:40]!r}, its file job {job_id}")
    # Paths come from the file's id and known kinds, never from the record: it cannot point elsewhere.
    files = {k: output_path(directory, job_id, k) for k in record.pop("files") if k in OUTPUTS}
    files = {k: path for k, path in files.items() if path.exists()}  # what is left of its outputs
    if unknown := set(record) - {*RECORDED, "request"}:  # what only this process knows is never read back
        raise ValueError(f"the record holds fields a job record has not: {', '.join(sorted(unknown))[:200]}")
    job = Job(**{**record, "request": VideoJobRequest(**record["request"]), "files": files})
    _check_state(job)
    return job


def _check_state(job: Job) -> None:
    """A restored job's state, as the queue and the API rely on it (ValueError naming what is wrong)."""
    number = (int, float)
    if job.status not in STATES:
        raise ValueError(f"status {job.status!r} is not one of {', '.join(STATES)}")
    if not isinstance(job.created, number) or isinstance(job.created, bool):
        raise ValueError(f"created must be a time, got {job.created!r}")
    if job.status in FINISHED and (not isinstance(job.finished, number) or isinstance(job.finished, bool)):
        raise ValueError(f"a {job.status} job needs the time it finished, got {job.finished!r}")
    for name in ("total", "attempts"):
        count = getattr(job, name)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{name} must be a count, got {count!r}")
    if not isinstance(job.timings, dict) or job.error is not None and not isinstance(job.error, str):
        raise ValueError("timings must be an object and error a string or null")
