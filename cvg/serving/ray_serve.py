"""`cvg serve` on Ray Serve: the same HTTP API (`cvg.serving.api`), its jobs run on engine replicas.

    app = build_app("models/compshapes-wan", "/srv/cvg-out", replicas=2)   # or autoscaling={...}
    serve.run(app, route_prefix="/")

Two deployments: `VideoGenerator`, one `Engine` per replica, runs a batch of jobs and streams its progress
(step by step, then the frames); `VideoApi`, the ingress, holds the job table and the files in one replica
and hands batches to the generators through a `RayRunner`, with as many job workers as generator replicas
(autoscaling on ongoing requests adds replicas up to `max_replicas`). A generator replica that dies
mid-batch (killed, out of memory) fails nothing silently: the batch is retried once on another replica,
and a second failure fails its jobs with the reason. An ingress that dies is started again by Serve; it
reads the job records on its directory (`JobQueue`), serves the finished jobs and runs again those that were
queued or running (tested). Needs the `serve` extra's Ray (`pip install "ray[serve]"`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import replace

from ray import serve
from ray.exceptions import RayActorError

from cvg import threads
from cvg.guidance.composition import CompositionError
from cvg.request import GenerationRequest
from cvg.serving.api import create_app
from cvg.serving.jobs import JobCancelled, JobQueue
from cvg.serving.runner import EngineRunner, VideoJobRequest, VideoResult
from cvg.serving.service import Engine

RETRIES = 1  # a batch whose replica died runs once more, elsewhere


@serve.deployment(max_ongoing_requests=1)  # one batch at a time: the engine runs one generation anyway
class VideoGenerator:
    def __init__(self, model: str, options: dict):
        threads.configure()  # a replica's process is an entry point of its own
        self.runner = EngineRunner(Engine(model, **options))
        self.replica = serve.get_replica_context().replica_id.unique_id

    def config(self) -> tuple[dict, str]:
        """The engine's settings (`Engine.defaults`) and the model's family."""
        return self.runner.engine.defaults, self.runner.family

    def check(self, request: VideoJobRequest) -> str | None:
        """The one-line reason the engine refuses `request`, or None."""
        try:
            self.runner.check(request)
        except (ValueError, TypeError, CompositionError) as e:
            return str(e)
        return None

    def run(self, requests: list[VideoJobRequest]) -> Iterator[dict]:
        """Stream `{"step": i}` after each denoising step, then `{"results": [VideoResult, ...]}`. Closing
        the stream (the caller cancelled) ends the run at its next step."""
        events, closed = queue.Queue(), threading.Event()

        def on_step(i: int) -> None:
            events.put(("step", i))
            if closed.is_set():
                raise JobCancelled

        def work() -> None:
            try:
                results = self.runner.run(requests, on_step)
                events.put(("results", [replace(r, served_by=self.replica) for r in results]))
            except BaseException as e:  # noqa: BLE001 - handed to the stream's reader
                events.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                yield {kind: value}
                if kind == "results":
                    return
        finally:
            closed.set()


class RayRunner:
    """What `JobQueue` needs of a runner, over `VideoGenerator` replicas."""

    def __init__(self, generator):
        self.generator = generator
        self._config: tuple[dict, str] | None = None
        self._lock = threading.Lock()

    def _base(self) -> tuple[dict, str]:
        with self._lock:  # asked of a replica once, on first use (never in a replica's constructor)
            if self._config is None:
                self._config = self.generator.config.remote().result()
            return self._config

    @property
    def family(self) -> str:
        return self._base()[1]

    def request(self, request: VideoJobRequest) -> GenerationRequest:
        return GenerationRequest(**{**self._base()[0], **request.given()})

    def check(self, request: VideoJobRequest) -> None:
        reason = self.generator.check.remote(request).result()
        if reason is not None:
            raise ValueError(reason)

    def run(self, requests: list[VideoJobRequest], on_step) -> list[VideoResult]:
        for attempt in range(RETRIES + 1):
            try:
                return self._stream(requests, on_step)
            except RayActorError as e:
                if attempt == RETRIES:
                    raise RuntimeError(f"the generator replica died, {attempt + 1} times ({type(e).__name__})") from e

    def _stream(self, requests: list[VideoJobRequest], on_step) -> list[VideoResult]:
        stream = self.generator.options(stream=True).run.remote(requests)
        try:
            for message in stream:
                if "results" in message:
                    return message["results"]
                on_step(message["step"])
        except JobCancelled:
            stream.cancel()
            raise
        raise RuntimeError("the generator's stream ended without results")


# Waits on HTTP and on the generators: no core of its own, and many requests at once (polls are cheap).
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress()
class VideoApi:
    """The HTTP API and the job table (keep one replica: the jobs live here)."""

    def __init__(self, generator, directory: str, api_options: dict | None = None, workers: int = 2, **queue_options):
        self.jobs = JobQueue(RayRunner(generator), directory, workers=workers, **queue_options)
        self.api_options = api_options or {}

    def __serve_build_asgi_app__(self):
        return create_app(self.jobs, **self.api_options)

    def __del__(self):
        self.jobs.close(timeout=10)


def build_app(
    model: str,
    directory: str,
    replicas: int = 2,
    autoscaling: dict | None = None,
    engine_options: dict | None = None,
    api_options: dict | None = None,
    **queue_options,
):
    """The Ray Serve application: `replicas` generator replicas (or `autoscaling`, Ray Serve's
    autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1}) behind
    one ingress with a job worker per replica it may have; `api_options` are `create_app`'s (token, model
    name). Ray Serve's own HTTP proxy holds the connections: `cvg.serving.http`'s guards are not on it."""
    generator = VideoGenerator.options(
        num_replicas="auto" if autoscaling else replicas, autoscaling_config=autoscaling
    ).bind(model, engine_options or {})
    workers = autoscaling["max_replicas"] if autoscaling else replicas
    return VideoApi.bind(generator, directory, api_options, workers, **queue_options)
