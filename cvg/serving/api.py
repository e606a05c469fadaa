"""`cvg serve`: asynchronous video jobs over HTTP (FastAPI), in OpenAI's video shape (`cvg.serving.videos`).

    POST   /v1/videos               JSON or a form: prompt, model, size, seconds, and cvg's composition, seed,
                                    num_frames, fps, guidance options, maps -> the Video object
    POST   /v1/videos/sync          the same, answered with the mp4 once it is made (bounded wait; vLLM-Omni's)
    GET    /v1/videos               the jobs held, newest first (?after=ID&limit=N&order=asc|desc)
    GET    /v1/videos/{id}          the Video object: status, progress percent, timings, error
    GET    /v1/videos/{id}/content  the mp4 (?variant=thumbnail: the first frame; maps: the maps picture)
    DELETE /v1/videos/{id}          a finished job is deleted with its files; an unfinished one cancelled (a
                                    running one stops at its next step: it then shows "failed", code "cancelled")
    GET    /v1/models, GET /healthz, GET /metrics (Prometheus), GET /openapi.json, /docs, /redoc

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`, the message one line: 400 a body that
is not JSON, 401 a missing or wrong bearer token (when the server has one: every route but /healthz needs
it, the schema and docs included), 404 an unknown job or model, 408 a body that stops arriving, 409 content
not ready, 410 content whose file is gone, 413 a body over the limit, 422 a request the schema, the server's
limits or the model refuse, 429 with Retry-After when the queue is full, 504 a sync request past its wait.
The jobs themselves run in `cvg.serving.jobs`; the connection guards (head deadline, connection cap) are
`cvg.serving.http`'s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cvg.guidance.composition import CompositionError
from cvg.serving.jobs import JobEvents, JobQueue, JobTooCostly, QueueFull
from cvg.serving.records import FINISHED, STATES, Job
from cvg.serving.videos import ModelNotFound, VideoRequest, error_body, job_request, video_object

MAX_BODY_BYTES = 64 * 1024
BODY_SECONDS = 10.0  # a request body must arrive within this (a client that stops sending holds nothing)
SYNC_SECONDS = 600.0  # the longest a POST /v1/videos/sync waits for its video
JOB_ID = re.compile(r"[0-9a-f]{32}")
RETRY_AFTER_SECONDS = 5
POLL_AFTER_MS = 500  # the openai client's poll interval, from the `openai-poll-after-ms` header
MEDIA = {"video": "video/mp4", "thumbnail": "image/png", "maps": "image/png"}


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


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def _validation_message(error: RequestValidationError | ValidationError) -> str:
    """The first field that failed, and why."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
    return f"{where}: {first.get('msg', 'invalid')}"


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, whether it says its length or not; one
    that stops arriving for `seconds` gets 408."""

    def __init__(self, app, limit: int, seconds: float = BODY_SECONDS):
        self.app, self.limit, self.seconds = app, limit, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the body is over {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _error(413, message)(scope, receive, send)
        received, complete = 0, False

        async def limited():
            nonlocal received, complete
            if complete:  # the body is in: later reads wait for a disconnect, as long as a response takes
                return await receive()
            try:
                event = await asyncio.wait_for(receive(), self.seconds)
            except TimeoutError:  # FastAPI passes its HTTPException through the body read
                raise HTTPException(408, f"the body stopped arriving for {self.seconds:g} s") from None
            received += len(event.get("body", b""))
            complete = event["type"] != "http.request" or not event.get("more_body", False)
            if received > self.limit:
                raise HTTPException(413, message)
            return event

        return await self.app(scope, limited, send)


async def _request_fields(request: Request) -> tuple[dict, bool]:
    """The posted fields and whether they came as a form: a JSON object, or a form's fields (multipart, as the
    openai client posts, or urlencoded), an empty form value standing for a field left out."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields = {}
        async with request.form(max_files=1, max_fields=64) as form:
            for key, value in form.multi_items():
                if not isinstance(value, str):
                    raise StarletteHTTPException(422, f"{key[:40]}: cvg makes videos from text; it takes no file")
                if key in fields:
                    raise StarletteHTTPException(422, f"{key[:40]} is given twice")
                if value != "":
                    fields[key] = value
        return fields, True
    try:
        fields = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StarletteHTTPException(400, "the body is not JSON (or a form)") from None
    if not isinstance(fields, dict):
        raise StarletteHTTPException(422, "the body must be a JSON object")
    return fields, False


def create_app(
    jobs: JobQueue,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    model_name: str = "cvg",
    sync_seconds: float = SYNC_SECONDS,
    body_seconds: float = BODY_SECONDS,
) -> FastAPI:
    """The HTTP API over `jobs`, serving the model as `model_name`; with `token`, every route but /healthz
    needs `Authorization: Bearer <token>`. A body must arrive within `body_seconds`; a sync request waits
    `sync_seconds` at most."""
    app = FastAPI(
        title="cvg",
        summary="compositional video generation jobs, in OpenAI's video shape",
        version="1",
        openapi_url=None,  # served below, behind the token
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes, seconds=body_seconds)
    metrics = Metrics()
    jobs.events = metrics.events()
    bearer = HTTPBearer(auto_error=False)
    started = int(time.time())

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise StarletteHTTPException(401, "a bearer token is needed (Authorization: Bearer <token>)")

    guarded = [Depends(authorised)]

    def job_or_404(job_id: str) -> Job:
        job = jobs.get(job_id) if JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise StarletteHTTPException(404, f"no video {job_id[:40]!r}")
        return job

    def shown(job: Job) -> dict:
        return video_object(job, jobs.runner.request(job.request), model_name, jobs.fps, jobs.keep_seconds)

    async def submitted(request: Request) -> Job | JSONResponse:
        try:
            fields, form = await _request_fields(request)
            # JSON is typed: `true` is no step count. A form's values are all text, read as the fields' types.
            body = VideoRequest.model_validate(fields, strict=not form)
            return await run_in_threadpool(jobs.submit, job_request(body, model_name, jobs.fps))
        except ValidationError as e:
            return _error(422, _validation_message(e))
        except ModelNotFound as e:
            return _error(404, str(e), "model_not_found")
        except QueueFull as e:
            return _error(429, str(e), "queue_full", {"Retry-After": str(RETRY_AFTER_SECONDS)})
        except JobTooCostly as e:
            return _error(422, str(e), "job_too_costly")
        except (ValueError, TypeError, CompositionError) as e:
            return _error(422, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else None
        return _error(error.status_code, str(error.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(error))

    @app.post("/v1/videos", dependencies=guarded, openapi_extra={"requestBody": _body_schema()})
    async def create_video(request: Request) -> Response:
        job = await submitted(request)
        return job if isinstance(job, JSONResponse) else JSONResponse(shown(job))

    @app.post("/v1/videos/sync", dependencies=guarded, openapi_extra={"requestBody": _body_schema()})
    async def create_video_and_wait(request: Request) -> Response:
        """Queue the video and answer with its mp4 once made (the job's id in `X-Video-Id`); past the server's
        wait, 504 naming the id to poll."""
        job = await submitted(request)
        if isinstance(job, JSONResponse):
            return job
        deadline = time.monotonic() + sync_seconds
        while job.status not in FINISHED:
            if time.monotonic() > deadline:
                return _error(504, f"video {job.id} is not made within {sync_seconds:g} s; poll it", "timeout")
            await asyncio.sleep(0.05)
        if job.status != "succeeded":
            message = "it was cancelled" if job.status == "cancelled" else job.error or "it failed"
            return _error(500, f"video {job.id} failed: {message}", "generation_failed")
        return _content(job, "video", {"X-Video-Id": job.id})

    @app.get("/v1/videos", dependencies=guarded)
    def list_videos(
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),  # noqa: B008
        order: Literal["asc", "desc"] = "desc",
    ) -> dict:
        listed = jobs.listed()
        listed = listed if order == "asc" else listed[::-1]
        if after is not None:
            ids = [job.id for job in listed]
            if after not in ids:
                raise StarletteHTTPException(404, f"no video {after[:40]!r} to list after")
            listed = listed[ids.index(after) + 1 :]
        page = [shown(job) for job in listed[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(listed) > limit,
        }

    @app.get("/v1/videos/{video_id}", dependencies=guarded)
    def retrieve_video(video_id: str) -> Response:
        job = job_or_404(video_id)
        headers = {"openai-poll-after-ms": str(POLL_AFTER_MS)} if job.status not in FINISHED else None
        return JSONResponse(shown(job), headers=headers)

    @app.get("/v1/videos/{video_id}/content", dependencies=guarded, response_model=None)
    def video_content(video_id: str, variant: Literal["video", "thumbnail", "maps"] = "video") -> Response:
        job = job_or_404(video_id)
        if job.status != "succeeded":
            return _error(409, f"video {video_id} is {job.status}: no content")
        return _content(job, variant)

    @app.delete("/v1/videos/{video_id}", dependencies=guarded)
    def delete_video(video_id: str) -> dict:
        """Delete a finished video and its files; cancel an unfinished one (a running one stops at its next
        step), which a second DELETE then deletes."""
        job = job_or_404(video_id)
        finished = job.status in FINISHED
        jobs.cancel(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": finished}

    @app.get("/v1/models", dependencies=guarded)
    def models() -> dict:
        model = {"id": model_name, "object": "model", "created": started, "owned_by": "cvg"}
        return {"object": "list", "data": [model]}

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok", "family": jobs.runner.family, "queued": jobs.queued, "states": list(STATES)}

    @app.get("/metrics", dependencies=guarded)
    def prometheus() -> Response:
        return Response(metrics.render(jobs), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/docs", dependencies=guarded, include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="cvg")

    @app.get("/redoc", dependencies=guarded, include_in_schema=False)
    def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title="cvg")

    app.state.jobs = jobs
    return app


def _content(job: Job, variant: str, headers: dict | None = None) -> Response:
    """A finished job's file of one variant: 404 where the job made none, 410 where it is gone."""
    path = job.files.get(variant)
    if path is None:
        return _error(404, f'video {job.id} has no {variant} (ask for maps with "maps": true)')
    if not path.is_file():
        return _error(410, f"the {variant} of video {job.id} is gone from the server's output directory")
    return FileResponse(path, media_type=MEDIA[variant], filename=f"{job.id}{''.join(path.suffixes)}", headers=headers)


def _body_schema() -> dict:
    """The request body's schema in the OpenAPI document (the route reads JSON or a form itself)."""
    schema = VideoRequest.model_json_schema()
    return {
        "required": True,
        "content": {kind: {"schema": schema} for kind in ("application/json", "multipart/form-data")},
    }
