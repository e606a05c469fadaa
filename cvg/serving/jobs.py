"""Video jobs: a bounded queue in front of a runner (an `Engine` in this process, `EngineRunner`, or engine
replicas elsewhere, `cvg.serving.ray_serve`), with progress, cancellation at the next denoising step,
batching, bounds on what a job may cost and how long it may run, outputs written atomically under a
directory the server owns, and retention.

    jobs = JobQueue(EngineRunner(engine), directory, max_queued=16, keep_seconds=3600)
    job = jobs.submit(VideoJobRequest(prompt="a red cube to the left of a blue ball",
                                      composition="red cube left of blue ball"))
    jobs.get(job.id).status      # queued -> running (job.step of job.total) -> succeeded | failed | cancelled
    jobs.cancel(job.id)          # a running job stops at its next step; nothing is decoded or written

A job's files are named by its id (32 hex digits the queue makes), never by anything a client sends, and
the queue deletes only files it wrote. Each job's record (`cvg.serving.records`: `<id>.job.json`, written
atomically when it is queued, starts and ends) survives the process: a queue opened on the same directory
takes the finished jobs back and runs again those that were queued or running when the last one stopped,
unless a job was running when `MAX_ATTEMPTS` servers stopped (a job that ends its server is failed, not
run a third time) or its request no longer passes what a posted one must (`admit`). One queue serves a
directory at a time (a lock: a second, in this process or another, is refused naming the holder's pid).
This module knows nothing of HTTP (`cvg.serving.api` serves it).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cvg.io.files import locked, write_text_atomic
from cvg.io.video import maps_picture, save_frames, save_image
from cvg.request import GenerationRequest
from cvg.serving.records import FINISHED, RECORD, STATES, Job, job_from, output_path, record_path
from cvg.serving.runner import Runner, VideoJobRequest, VideoResult, check_limits, job_cost

LOCK = ".queue.lock"  # in the output directory: held by the one queue that serves it
MAX_ATTEMPTS = 2  # servers a job may have been running in when they stopped; then it is failed, not run again


class QueueFull(RuntimeError):
    """The queue holds `max_queued` jobs already."""


class JobCancelled(Exception):
    """Raised at a step boundary of a job whose cancellation was asked for."""


class JobTooCostly(ValueError):
    """A request over the queue's `max_cost_ratio` (`job_cost`)."""


class JobTimedOut(Exception):
    """Raised at a step boundary of a batch that ran past the queue's `job_timeout`."""


@dataclass
class JobEvents:
    """Callbacks for metrics: a step's seconds, a finished job (its status and seconds)."""

    on_step: Callable[[float], None] = lambda seconds: None
    on_finish: Callable[[str, float], None] = lambda status, seconds: None


class JobQueue:
    def __init__(
        self,
        runner: Runner,
        directory: str | Path,
        max_queued: int = 16,
        keep_seconds: float = 3600.0,
        events: JobEvents | None = None,
        fps: int = 16,
        max_batch: int = 1,
        batch_window: float = 0.05,
        workers: int = 1,
        max_cost_ratio: float | None = None,
        job_timeout: float | None = None,
    ):
        """Jobs run on `runner`, `workers` denoising runs at a time (1 for an engine in this process; one per
        replica elsewhere); at most `max_queued` wait. With `max_batch` > 1,
        up to that many queued jobs of the same settings (size, steps, scales, guidance window; guided or
        not) run as one batch, waiting up to `batch_window` seconds for company. Finished jobs, and the files
        they wrote into `directory`, are dropped `keep_seconds` after they finish. A request costing more than
        `max_cost_ratio` times the server's default guided request (`job_cost`) is refused; a run past
        `job_timeout` seconds fails its jobs at its next step."""
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
        self.max_cost_ratio, self.job_timeout = max_cost_ratio, job_timeout
        self._unit_cost: int | None = None  # the server's default guided request's (`_cost_ratio`)
        self.events = events or JobEvents()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._waiting: list[str] = []
        self._lock = threading.Condition()
        self._closed = False
        with self._lock:
            self._restore()
        self._workers = [threading.Thread(target=self._run, name=f"cvg-jobs-{i}", daemon=True) for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def submit(self, request: VideoJobRequest) -> Job:
        """Queue a request the engine accepts (checked now: ValueError / CompositionError naming the
        problem; JobTooCostly over `max_cost_ratio`), or QueueFull."""
        resolved = self.admit(request)
        with self._lock:
            self._expire()
            if self._closed:
                raise RuntimeError("the job queue is closed")
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"{len(self._waiting)} jobs are queued already (the limit)")
            job = Job(uuid.uuid4().hex, request, total=resolved.num_inference_steps, admitted=True)
            self._jobs[job.id] = job
            self._waiting.append(job.id)
            self._save(job)
            self._lock.notify_all()
            return job

    def admit(self, request: VideoJobRequest) -> GenerationRequest:
        """What the queue refuses of a request (a ValueError naming the problem): the server's limits, the
        model's checks, a cost over `max_cost_ratio`. Posted requests pass it before they queue, restored ones
        before they run. Returns what the request runs (`Runner.request`)."""
        check_limits(request)
        self.runner.check(request)
        resolved = self.runner.request(request)
        if request.maps and (not request.composition or request.guide_steps == 0):
            raise ValueError("maps needs a composition and a guided step: the maps are those guidance reads")
        if self.max_cost_ratio is not None and (ratio := self._cost_ratio(resolved)) > self.max_cost_ratio:
            raise JobTooCostly(
                f"the job costs {ratio:.3g} times this server's default guided job (pixels x frames x (steps + "
                f"2 per guided update)); it runs at most {self.max_cost_ratio:g} times: ask for fewer frames, "
                "steps or pixels"
            )
        return resolved

    def _cost_ratio(self, resolved: GenerationRequest) -> float:
        """`job_cost` of a resolved request over that of the server's default guided request."""
        if self._unit_cost is None:  # asked of the runner on first use (a Ray runner asks a replica)
            self._unit_cost = job_cost(self.runner.request(VideoJobRequest(prompt="-", composition="-")))
        return job_cost(resolved) / self._unit_cost

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

    def listed(self) -> list[Job]:
        """The jobs held, oldest first."""
        with self._lock:
            self._expire()
            return list(self._jobs.values())

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
            outcomes = self._refused(batch)
            runnable = [job for job in batch if job.id not in outcomes]
            try:
                outcomes |= self._generate(runnable) if runnable else {}
            except JobCancelled:
                if self._closed:  # interrupted by close(), not by its clients: queued again for the next queue
                    self._requeue(runnable)
                outcomes |= {job.id: ("cancelled", None) for job in runnable}
            except JobTimedOut:
                reason = f"the job ran past this server's time limit of {self.job_timeout:g} s per job"
                outcomes |= {job.id: ("failed", reason) for job in runnable}
            except Exception as e:  # the jobs fail with a one-line reason; the queue goes on
                error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
                outcomes |= {job.id: ("failed", error) for job in runnable}
            with self._lock:
                for job in batch:
                    if job.status == "running":  # not ended already by a cancellation mid-batch, nor requeued
                        self._finish(job, *outcomes[job.id])

    def _refused(self, batch: list[Job]) -> dict[str, tuple[str, str]]:
        """The jobs of a batch the queue refuses now (restored from a record: `admit`), failed with the reason."""
        refused = {}
        for job in batch:
            if job.admitted:  # posted to this queue: admitted before it was queued
                continue
            try:
                self.admit(job.request)
            except (ValueError, TypeError) as e:
                refused[job.id] = ("failed", " ".join(str(e).split())[:500])
        return refused

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
                job.status, job.started, job.attempts = "running", time.time(), job.attempts + 1
                self._save(job)
            return batch

    def _generate(self, batch: list[Job]) -> dict[str, tuple[str, str | None]]:
        """Run a batch and write each job's files; per job id, (status, error)."""
        outcomes = {}
        last = [time.perf_counter()]
        deadline = None if self.job_timeout is None else last[0] + self.job_timeout

        def step_done(i: int) -> None:
            if self._closed:
                raise JobCancelled
            now = time.perf_counter()
            if deadline is not None and now > deadline:
                raise JobTimedOut
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
        for job, result in zip(batch, results, strict=True):
            if job.cancel_requested.is_set():  # cancelled while its batch ran on: nothing of it is written
                outcomes[job.id] = ("cancelled", None)
                continue
            job.timings, job.served_by = {**result.timings, "batch": len(batch)}, result.served_by
            job.files = self._write(job, result)
            outcomes[job.id] = ("succeeded", None)
        return outcomes

    def _write(self, job: Job, result: VideoResult) -> dict[str, Path]:
        files = {
            "video": save_frames(result.frames, self._output(job.id, "video"), fps=job.request.fps or self.fps),
            "thumbnail": save_image(Image.fromarray(result.frames[0]), self._output(job.id, "thumbnail")),
        }
        if result.maps is not None:
            picture = maps_picture(result.maps, result.frames, result.entities)
            files["maps"] = save_image(picture, self._output(job.id, "maps"))
        return files

    def _output(self, job_id: str, kind: str) -> Path:
        return output_path(self.directory, job_id, kind)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.status, job.error, job.finished = status, error, time.time()
        self._save(job)
        self.events.on_finish(status, job.finished - (job.started or job.created))
        self._lock.notify_all()

    def _requeue(self, batch: list[Job]) -> None:
        with self._lock:
            for job in batch:
                if job.status == "running":  # a stop that was asked for: the attempt does not count
                    job.status, job.started, job.step, job.attempts = "queued", None, 0, job.attempts - 1
                    self._save(job)

    def _save(self, job: Job) -> None:
        write_text_atomic(record_path(self.directory, job.id), json.dumps(job.record()))

    def _forget(self, job: Job) -> None:
        for path in [
            *job.files.values(),
            record_path(self.directory, job.id),
        ]:  # only what this queue wrote, under its names
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
                    jobs.append(job_from(json.loads(path.read_text()), name.group(1), self.directory))
                except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                    warnings.warn(
                        f"cvg serve: job record {path.name} is unreadable ({e!r}); left as it is", stacklevel=2
                    )
        for job in sorted(jobs, key=lambda j: j.created):
            self._jobs[job.id] = job
            if job.status in FINISHED:
                continue
            if job.status == "running" and job.attempts >= MAX_ATTEMPTS:
                self._finish(job, "failed", f"the server stopped while running it, {job.attempts} times; not run again")
                continue
            job.status, job.started = "queued", None
            self._waiting.append(job.id)
            self._save(job)

    def _expire(self) -> None:
        horizon = time.time() - self.keep_seconds
        for job in [j for j in self._jobs.values() if j.status in FINISHED and j.finished < horizon]:
            self._forget(job)
