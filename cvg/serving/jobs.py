"""Video jobs: a bounded queue in front of a runner (an `Engine` in this process, `EngineRunner`, or engine
replicas elsewhere, `cvg.serving.ray_serve`), with progress, cancellation at the next denoising step,
batching, outputs written atomically under a directory the server owns, and retention.

    jobs = JobQueue(EngineRunner(engine), directory, max_queued=16, keep_seconds=3600)
    job = jobs.submit(VideoJobRequest(prompt="a red cube to the left of a blue ball",
                                      composition="red cube left of blue ball"))
    jobs.get(job.id).status      # queued -> running (job.step of job.total) -> succeeded | failed | cancelled
    jobs.cancel(job.id)          # a running job stops at its next step; nothing is decoded or written

A job's files are named by its id (32 hex digits the queue makes), never by anything a client sends, and
the queue deletes only files it wrote. Each job's record (`<id>.job.json`, written atomically when it is
queued, starts and ends) survives the process: a queue opened on the same directory takes the finished
jobs back and runs again those that were queued or running when the last one stopped. One queue serves a
directory at a time (a lock: a second, in this process or another, is refused naming the holder's pid).
This module knows nothing of HTTP (`cvg.serving.api` serves it).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cvg.io.files import locked, write_text_atomic
from cvg.io.video import maps_picture, save_frames, save_image
from cvg.serving.runner import EngineRunner, VideoJobRequest, VideoResult

LOCK = ".queue.lock"  # in the output directory: held by the one queue that serves it
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
RECORD = re.compile(r"([0-9a-f]{32})\.job\.json")
OUTPUTS = {"video": "{id}.mp4", "maps": "{id}.maps.png"}  # a job's files, by kind: named by its id alone


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
    files: dict[str, Path] = field(default_factory=dict)  # kind ("video", "maps") -> what this job wrote
    served_by: str = ""
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def record(self) -> dict:
        """What survives the process (`JobQueue` reads it back)."""
        fields = ("id", "status", "total", "created", "started", "finished", "error", "timings", "served_by")
        return {
            **{k: getattr(self, k) for k in fields},
            "request": asdict(self.request),
            "files": sorted(self.files),  # their kinds: the names follow from the id (OUTPUTS)
        }

    def view(self) -> dict:
        """The job as a client sees it (no paths)."""
        return {
            "id": self.id,
            "status": self.status,
            "progress": {"step": self.step, "total": self.total},
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "timings": self.timings,
            "content": sorted(self.files),
            "served_by": self.served_by,
        }


def _check_record(job: Job) -> None:
    """A restored job's state, as the queue and the API rely on it (ValueError naming what is wrong)."""
    number = (int, float)
    if job.status not in STATES:
        raise ValueError(f"status {job.status!r} is not one of {', '.join(STATES)}")
    if not isinstance(job.created, number) or isinstance(job.created, bool):
        raise ValueError(f"created must be a time, got {job.created!r}")
    if job.status in FINISHED and (not isinstance(job.finished, number) or isinstance(job.finished, bool)):
        raise ValueError(f"a {job.status} job needs the time it finished, got {job.finished!r}")
    if not isinstance(job.total, int) or isinstance(job.total, bool) or job.total < 0:
        raise ValueError(f"total must be a step count, got {job.total!r}")
    if not isinstance(job.timings, dict) or job.error is not None and not isinstance(job.error, str):
        raise ValueError("timings must be an object and error a string or null")


class QueueFull(RuntimeError):
    """The queue holds `max_queued` jobs already."""


class JobCancelled(Exception):
    """Raised at a step boundary of a job whose cancellation was asked for."""


@dataclass
class JobEvents:
    """Callbacks for metrics: a step's seconds, a finished job (its status and seconds)."""

    on_step: Callable[[float], None] = lambda seconds: None
    on_finish: Callable[[str, float], None] = lambda status, seconds: None


class JobQueue:
    def __init__(
        self,
        runner: EngineRunner,
        directory: str | Path,
        max_queued: int = 16,
        keep_seconds: float = 3600.0,
        events: JobEvents | None = None,
        fps: int = 16,
        max_batch: int = 1,
        batch_window: float = 0.05,
        workers: int = 1,
    ):
        """Jobs run on `runner`, `workers` denoising runs at a time (1 for an engine in this process; one per
        replica elsewhere); at most `max_queued` wait. With `max_batch` > 1,
        up to that many queued jobs of the same settings (size, steps, scales, guidance window; guided or
        not) run as one batch, waiting up to `batch_window` seconds for company. Finished jobs, and the files
        they wrote into `directory`, are dropped `keep_seconds` after they finish."""
        if min(max_queued, max_batch, workers) < 1:
            raise ValueError(
                f"max_queued, max_batch and workers must be at least 1, got {max_queued}, {max_batch}, {workers}"
            )
        self.runner, self.directory = runner, Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # One queue per directory: two would both run the jobs recorded there (LockedError names the holder).
        self._held = contextlib.ExitStack()
        self._held.enter_context(locked(self.directory / LOCK, wait=False))
        self.max_queued, self.keep_seconds, self.fps = max_queued, keep_seconds, fps
        self.max_batch, self.batch_window = max_batch, batch_window
        self.events = events or JobEvents()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._waiting: list[str] = []
        self._lock = threading.Condition()
        self._closed = False
        self._restore()
        self._workers = [threading.Thread(target=self._run, name=f"cvg-jobs-{i}", daemon=True) for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def submit(self, request: VideoJobRequest) -> Job:
        """Queue a request the engine accepts (checked now: ValueError / CompositionError naming the
        problem), or QueueFull."""
        self.runner.check(request)
        if request.maps and not request.composition:
            raise ValueError("maps needs a composition: the maps are those guidance reads")
        with self._lock:
            self._expire()
            if self._closed:
                raise RuntimeError("the job queue is closed")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"{len(self._waiting)} jobs are queued already (the limit)")
            job = Job(uuid.uuid4().hex, request, total=self.runner.request(request).num_inference_steps)
            self._jobs[job.id] = job
            self._waiting.append(job.id)
            self._save(job)
            self._lock.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._expire()
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled now; a running one at its next step boundary; a finished one is
        forgotten, with the files it wrote. None: no such job."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                self._waiting.remove(job_id)
                self._finish(job, "cancelled")
            elif job.status == "running":
                job.cancel_requested.set()
            else:
                self._forget(job)
            return job

    def counts(self) -> dict[str, int]:
        """Jobs held, by status."""
        with self._lock:
            counts = dict.fromkeys(STATES, 0)
            for job in self._jobs.values():
                counts[job.status] += 1
            return counts

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        """Stop: running jobs end at their next step. What waits and what ran stays queued in its record,
        for the next queue on this directory."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for worker in self._workers:
            worker.join(timeout)
        if not any(worker.is_alive() for worker in self._workers):  # a worker still writing keeps the lock
            self._held.close()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                outcomes = self._generate(batch)
            except JobCancelled:
                if self._closed:  # interrupted by close(), not by its clients: queued again for the next queue
                    self._requeue(batch)
                    continue
                outcomes = {job.id: ("cancelled", None) for job in batch}
            except Exception as e:  # the jobs fail with a one-line reason; the queue goes on
                error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
                outcomes = {job.id: ("failed", error) for job in batch}
            with self._lock:
                for job in batch:
                    if job.status == "running":  # not ended already by a cancellation mid-batch
                        self._finish(job, *outcomes[job.id])

    def _batch_key(self, request: VideoJobRequest) -> tuple:
        """Jobs with equal keys may share a denoising run."""
        return self.runner.request(request).settings(), request.composition is None

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and, up to `max_batch`, later ones that may share its run (waiting up to
        `batch_window` for them); None once the queue is closed."""
        with self._lock:
            while not self._waiting and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            batch = [self._jobs[self._waiting.pop(0)]]
            key, deadline = self._batch_key(batch[0].request), time.monotonic() + self.batch_window
            while len(batch) < self.max_batch and not self._closed:
                matching = [i for i in self._waiting if self._batch_key(self._jobs[i].request) == key]
                for job_id in matching[: self.max_batch - len(batch)]:
                    self._waiting.remove(job_id)
                    batch.append(self._jobs[job_id])
                if len(batch) == self.max_batch or (left := deadline - time.monotonic()) <= 0:
                    break
                self._lock.wait(left)
            for job in batch:
                job.status, job.started = "running", time.time()
                self._save(job)
            return batch

    def _generate(self, batch: list[Job]) -> dict[str, tuple[str, str | None]]:
        """Run a batch and write each job's files; per job id, (status, error)."""
        last = [time.perf_counter()]

        def step_done(i: int) -> None:
            if self._closed:
                raise JobCancelled
            now = time.perf_counter()
            last[0], seconds = now, now - last[0]
            with self._lock:
                for job in batch:
                    job.step = i + 1
                    if job.cancel_requested.is_set() and job.status == "running":  # its batch runs on
                        self._finish(job, "cancelled")
            self.events.on_step(seconds)
            if all(job.cancel_requested.is_set() for job in batch):
                raise JobCancelled

        if all(job.cancel_requested.is_set() for job in batch):
            raise JobCancelled
        results = self.runner.run([job.request for job in batch], step_done)
        outcomes = {}
        for job, result in zip(batch, results, strict=True):
            if job.cancel_requested.is_set():  # cancelled while its batch ran on: nothing of it is written
                outcomes[job.id] = ("cancelled", None)
                continue
            job.timings, job.served_by = {**result.timings, "batch": len(batch)}, result.served_by
            job.files = self._write(job, result)
            outcomes[job.id] = ("succeeded", None)
        return outcomes

    def _write(self, job: Job, result: VideoResult) -> dict[str, Path]:
        files = {"video": save_frames(result.frames, self._output(job.id, "video"), fps=self.fps)}
        if result.maps is not None:
            picture = maps_picture(result.maps, result.frames, result.entities)
            files["maps"] = save_image(picture, self._output(job.id, "maps"))
        return files

    def _output(self, job_id: str, kind: str) -> Path:
        return self.directory / OUTPUTS[kind].format(id=job_id)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        self._save(job)
        self.events.on_finish(status, job.finished - (job.started or job.created))
        self._lock.notify_all()

    def _requeue(self, batch: list[Job]) -> None:
        with self._lock:
            for job in batch:
                if job.status == "running":
                    job.status, job.started, job.step = "queued", None, 0
                    self._save(job)

    def _record_path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.job.json"

    def _save(self, job: Job) -> None:
        write_text_atomic(self._record_path(job.id), json.dumps(job.record()))

    def _forget(self, job: Job) -> None:
        for path in [*job.files.values(), self._record_path(job.id)]:  # only what this queue wrote, under its names
            path.unlink(missing_ok=True)
        del self._jobs[job.id]

    def _restore(self) -> None:
        """The jobs recorded in the directory, oldest first: finished ones as they ended, the others queued
        again from their first step (a process that stopped mid-run wrote nothing of them). A record that
        cannot be read is left where it is, with a warning: it is not this queue's to delete."""
        jobs = []
        for path in self.directory.iterdir():
            if name := RECORD.fullmatch(path.name):
                try:
                    jobs.append(self._job_from(json.loads(path.read_text()), name.group(1)))
                except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                    warnings.warn(
                        f"cvg serve: job record {path.name} is unreadable ({e!r}); left as it is", stacklevel=2
                    )
        for job in sorted(jobs, key=lambda j: j.created):
            self._jobs[job.id] = job
            if job.status not in FINISHED:
                job.status, job.started = "queued", None
                self._waiting.append(job.id)
                self._save(job)

    def _job_from(self, record: dict, job_id: str) -> Job:
        """The job of a record read from `{job_id}.job.json`, checked: a record that names another id, or
        whose state does not hold together, is refused (ValueError), so its files are never taken for
        another job's and no later request trips on it."""
        if not isinstance(record, dict) or record.get("id") != job_id:
            found = record.get("id") if isinstance(record, dict) else record
            raise ValueError(f"the record names job {str(found)[:40]!r}, its file job {job_id}")
        # Paths come from the file's id and known kinds, never from the record: it cannot point elsewhere.
        files = {k: self._output(job_id, k) for k in record.pop("files") if k in OUTPUTS}
        files = {k: path for k, path in files.items() if path.exists()}  # what is left of its outputs
        job = Job(**{**record, "request": VideoJobRequest(**record["request"]), "files": files})
        _check_record(job)
        return job

    def _expire(self) -> None:
        horizon = time.time() - self.keep_seconds
        for job in [j for j in self._jobs.values() if j.status in FINISHED and j.finished < horizon]:
            self._forget(job)
