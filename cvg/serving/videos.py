"""OpenAI's video shape over cvg's jobs (the shape vLLM-Omni, SGLang Diffusion and the official `openai`
client speak): what `POST /v1/videos` may carry, OpenAI's fields and cvg's, as JSON or a form
(`VideoRequest`), made into a `VideoJobRequest` (`job_request`); a job shown as OpenAI's `Video` object with
cvg's progress and timings beside it (`video_object`); errors as OpenAI's `{"error": {...}}` (`error_body`).

    size "640x480"  = width 640, height 480        seconds "4" at fps 16 = num_frames 4 * 16 + 1 = 65
Both spellings of one thing are refused when they disagree. A clip of `num_frames` frames at `fps` lasts
`(num_frames - 1) / fps` seconds, the convention of Wan's 81 frames at 16 fps ("5 seconds").
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING

from pydantic import ConfigDict, Field, create_model

from cvg.request import GenerationRequest, declared
from cvg.serving.records import Job
from cvg.serving.runner import SERVER_LIMITS, VideoJobRequest

# A job's state as OpenAI names it; a cancelled job is a failed one whose error code says "cancelled".
STATUS = {
    "queued": "queued",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "failed",
}
SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 504: "server_error"}


class ModelNotFound(ValueError):
    """A request naming a model this server does not serve."""


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
    __doc__="A video job: OpenAI's fields (model, size, seconds) and `cvg.request.GenerationRequest`'s, the "
    "server's limits on them, `fps` and `maps`. Fields left out take the server's settings; the model checks "
    "the rest (multiples, frame counts).",
    model=(str | None, Field(None, max_length=200, description="the served model's name (GET /v1/models)")),
    size=(str | None, Field(None, max_length=11, description='"WIDTHxHEIGHT" in pixels, e.g. "832x480"')),
    seconds=(
        float | None,
        Field(None, gt=0, le=60, allow_inf_nan=False, description="length: (num_frames - 1) / fps seconds"),
    ),
    **{name: _schema_field(name, spec) for name, spec in declared(VideoJobRequest).items()},
)


def job_request(body, served_model: str, fps: int) -> VideoJobRequest:
    """The job a validated `VideoRequest` asks for: `size` as width and height, `seconds` as frames at the
    request's fps (else the server's `fps`); ValueError when two spellings disagree, ModelNotFound for another
    model's name."""
    given = body.model_dump(exclude_unset=True)
    model, size, seconds = (given.pop(k, None) for k in ("model", "size", "seconds"))
    if model is not None and model != served_model:
        raise ModelNotFound(f"model {model[:80]!r} is not served here; this server serves {served_model!r}")
    if size is not None:
        match = SIZE.fullmatch(size)
        if match is None:
            raise ValueError(f'size must be "WIDTHxHEIGHT" in pixels, e.g. "832x480", got {size[:20]!r}')
        _agree(given, "width", int(match[1]), f"size {size}")
        _agree(given, "height", int(match[2]), f"size {size}")
    if seconds is not None:
        rate = given.get("fps") or fps
        frames = seconds * rate
        if abs(frames - round(frames)) > 1e-6:
            raise ValueError(f"seconds {seconds:g} at {rate} fps is not a whole number of frames")
        _agree(given, "num_frames", round(frames) + 1, f"seconds {seconds:g} at {rate} fps")
    return VideoJobRequest(**given)


def _agree(given: dict, name: str, value: int, spelling: str) -> None:
    if given.get(name) not in (None, value):
        raise ValueError(f"{spelling} means {name} {value}, but {name} is {given[name]}: give one or make them agree")
    given[name] = value


def video_object(job: Job, resolved: GenerationRequest, model: str, fps: int, keep_seconds: float) -> dict:
    """The job as OpenAI's `Video` (status, percent progress, Unix times, size, seconds, model, error) and,
    beside it, cvg's own: the composition, steps done of the total, timings and the content variants."""
    status = STATUS[job.status]
    rate = job.request.fps or fps
    error = None
    if job.status == "cancelled":
        error = {"code": "cancelled", "message": "cancelled by a DELETE before it finished"}
    elif job.status == "failed":
        error = {"code": "generation_failed", "message": job.error or "failed"}
    return {
        "id": job.id,
        "object": "video",
        "model": model,
        "status": status,
        "progress": 100 if status == "completed" else math.floor(100 * job.step / job.total) if job.total else 0,
        "created_at": int(job.created),
        "completed_at": None if job.finished is None else int(job.finished),
        "expires_at": None if job.finished is None else int(job.finished + keep_seconds),
        "size": f"{resolved.width}x{resolved.height}",
        "seconds": f"{(resolved.num_frames - 1) / rate:g}",
        "prompt": job.request.prompt,
        "error": error,
        "remixed_from_video_id": None,
        "composition": job.request.composition,
        "num_frames": resolved.num_frames,
        "fps": rate,
        "seed": resolved.seed,
        "steps": {"done": job.step, "total": job.total},
        "timings": job.timings,
        "content": sorted(job.files),
        "served_by": job.served_by,
    }


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`, the message on one line."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": " ".join(message.split())[:500], "type": kind, "param": param, "code": code}}
