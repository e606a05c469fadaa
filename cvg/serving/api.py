"""`cvg serve`: asynchronous video jobs over HTTP (FastAPI), the shape the video serving stacks use.

    POST   /v1/videos               {"prompt", "composition", "seed", "height", ...} -> 202 {"id", "status", ...}
    GET    /v1/videos/{id}          status, progress (step i of n), timings, error
    GET    /v1/videos/{id}/content  the mp4 (?variant=maps: the maps picture, when the job asked for it)
    DELETE /v1/videos/{id}          cancel (a running job stops at its next step); a finished job is deleted
    GET    /healthz, GET /metrics (Prometheus), GET /openapi.json

Errors are {"error": "<one line>"}: 400 a body that is not JSON, 401 a missing or wrong bearer token (when
the server has one), 404 an unknown job, 409 content not ready, 413 a body over the limit, 422 a request
the schema or the model refuses (a composition word missing from the prompt), 429 with Retry-After when the
queue is full. The jobs themselves run in `cvg.serving.jobs`.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import MISSING
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from cvg.guidance.composition import CompositionError
from cvg.request import declared
from cvg.serving.jobs import FINISHED, STATES, JobEvents, JobQueue, QueueFull
from cvg.serving.runner import VideoJobRequest

MAX_BODY_BYTES = 64 * 1024
JOB_ID = re.compile(r"[0-9a-f]{32}")
RETRY_AFTER_SECONDS = 5


# The server's limits on a request, beyond what any model accepts (`GenerationRequest`'s bounds): a job of
# more is refused before it queues.
SERVER_LIMITS = {
    "prompt": {"min_length": 1, "max_length": 2000},
    "composition": {"max_length": 500},
    "negative_prompt": {"max_length": 2000},
    "height": {"ge": 1, "le": 1280},
    "width": {"ge": 1, "le": 1280},
    "num_frames": {"le": 161},
    "num_inference_steps": {"le": 200},
    "guidance_scale": {"ge": 0, "le": 50},
    "guidance_scale_2": {"ge": 0, "le": 50},
    "guide_steps": {"le": 200},
    "guidance_strength": {"le": 10},
}


def _schema_field(name: str, spec: dict) -> tuple[object, object]:
    """The pydantic type and `Field` of one `VideoJobRequest` field: its declared type (str where the
    declaration leaves it open: a prompt, a composition), help, default and bounds, and the server's limits."""
    kind, required = spec["kind"] or str, spec["default"] is MISSING
    bounds = {"ge": spec["low"], "le": spec["high"]}
    limits = {**{k: v for k, v in bounds.items() if v is not None}, **SERVER_LIMITS.get(name, {})}
    if kind is float:
        limits["allow_inf_nan"] = False
    annotation = kind if required else kind | None
    return annotation, Field(... if required else spec["default"], description=spec["help"], **limits)


VideoRequest = create_model(
    "VideoRequest",
    __config__=ConfigDict(extra="forbid"),
    __doc__="A video job: `cvg.request.GenerationRequest`'s fields, the server's limits on them, and `maps`. "
    "Fields left out take the server's settings; the model checks the rest (multiples, frame counts).",
    **{name: _schema_field(name, spec) for name, spec in declared(VideoJobRequest).items()},
)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge("cvg_queue_depth", "jobs waiting", registry=self.registry)
        self.jobs = Gauge("cvg_jobs", "jobs held, by state", ["state"], registry=self.registry)
        self.finished = Counter("cvg_jobs_finished", "jobs finished, by outcome", ["state"], registry=self.registry)
        self.step_seconds = Histogram("cvg_step_seconds", "seconds per denoising step", registry=self.registry)
        self.job_seconds = Histogram(
            "cvg_job_seconds",
            "seconds from start (or submission, for jobs cancelled in the queue) to the end",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )

    def events(self) -> JobEvents:
        return JobEvents(
            on_step=self.step_seconds.observe,
            on_finish=lambda state, seconds: (self.finished.labels(state).inc(), self.job_seconds.observe(seconds)),
        )

    def render(self, jobs: JobQueue) -> bytes:
        self.queue_depth.set(jobs.queued)
        for state, count in jobs.counts().items():
            self.jobs.labels(state).set(count)
        return generate_latest(self.registry)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())[:500]}, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[int, str]:
    """400 for a body that is not JSON, else 422 naming the first field that failed."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return 400, "the body is not JSON"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return 422, f"{where}: {first.get('msg', 'invalid')}"


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether it says its length or not."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the body is over {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _error(413, message)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit:  # FastAPI passes its HTTPException through the body read
                raise HTTPException(413, message)
            return event

        return await self.app(scope, limited, send)


def create_app(jobs: JobQueue, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The HTTP API over `jobs`; with `token`, every route but /healthz needs `Authorization: Bearer <token>`."""
    app = FastAPI(title="cvg", summary="compositional video generation jobs", version="1")
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    metrics = Metrics()
    jobs.events = metrics.events()
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise StarletteHTTPException(401, "a bearer token is needed (Authorization: Bearer <token>)")

    def job_or_404(job_id: str):
        job = jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise StarletteHTTPException(404, f"no job {job_id[:40]!r}")
        return job

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        return _error(error.status_code, str(error.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(error))

    @app.post("/v1/videos", status_code=202, dependencies=[Depends(authorised)])
    def create_video(body: VideoRequest) -> dict:
        try:
            job = jobs.submit(VideoJobRequest(**body.model_dump(exclude_unset=True)))
        except QueueFull as e:
            return _error(429, str(e), {"Retry-After": str(RETRY_AFTER_SECONDS)})
        except (ValueError, TypeError, CompositionError) as e:
            return _error(422, str(e))
        return job.view()

    @app.get("/v1/videos/{job_id}", dependencies=[Depends(authorised)])
    def video_status(job_id: str) -> dict:
        return job_or_404(job_id).view()

    @app.get("/v1/videos/{job_id}/content", dependencies=[Depends(authorised)], response_model=None)
    def video_content(job_id: str, variant: Literal["video", "maps"] = "video") -> Response:
        job = job_or_404(job_id)
        if job.status != "succeeded":
            return _error(409, f"job {job_id} is {job.status}: no content")
        path = job.files.get(variant)
        if path is None:
            return _error(404, f'job {job_id} has no {variant} (ask for maps with "maps": true)')
        media = "video/mp4" if variant == "video" else "image/png"
        return FileResponse(path, media_type=media, filename=f"{job_id}{''.join(path.suffixes)}")

    @app.delete("/v1/videos/{job_id}", dependencies=[Depends(authorised)])
    def delete_video(job_id: str) -> dict:
        """Cancel a queued or running job (a running one stops at its next step: poll for "cancelled");
        delete a finished one and its files."""
        job = job_or_404(job_id)
        finished = job.status in FINISHED
        jobs.cancel(job_id)
        return {**job.view(), "deleted": finished}

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok", "family": jobs.runner.family, "queued": jobs.queued, "states": list(STATES)}

    @app.get("/metrics", dependencies=[Depends(authorised)])
    def prometheus() -> Response:
        return Response(metrics.render(jobs), media_type=CONTENT_TYPE_LATEST)

    app.state.jobs = jobs
    return app
