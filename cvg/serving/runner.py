"""What a job asks for (`VideoJobRequest`, derived from `cvg.request.GenerationRequest`) and the server's
limits on it (`SERVER_LIMITS`, `job_cost`), what it gives back (`VideoResult`), and the runner that runs jobs
on an `Engine` in this process (`EngineRunner`; Ray replicas elsewhere: `cvg.serving.ray_serve`)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Protocol

import numpy as np

from cvg.guidance.binding import BoundBatch
from cvg.io.video import to_uint8
from cvg.request import GenerationRequest, check_field, check_fields, documented
from cvg.serving.service import Engine

SERVED_FIELDS = tuple(f.name for f in fields(GenerationRequest) if f.name != "num_videos_per_prompt")  # one a job
VideoJobRequest = make_dataclass(
    "VideoJobRequest",
    [  # each served field as declared, but optional: None takes the server's setting
        (
            f.name,
            f"{f.type} | None" if f.default is not MISSING else f.type,
            field(default=None if f.default is not MISSING else MISSING, metadata=f.metadata),
        )
        for f in fields(GenerationRequest)
        if f.name in SERVED_FIELDS
    ]
    + [
        ("maps", "bool", documented(False, "also write the maps picture of the last guided step")),
        ("fps", "int | None", documented(None, "frames per second of the mp4 (None: the server's)", low=1, high=120)),
    ],
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": "What a client asks for: `GenerationRequest`'s fields (None: the server's setting, else the "
        "declaration's default), and whether to keep the maps picture.",
        "given": lambda self: {k: getattr(self, k) for k in SERVED_FIELDS if getattr(self, k) is not None},
    },
)


# The server's limits on a request, beyond what any model accepts (`GenerationRequest`'s bounds), in pydantic's
# words: a job of more is refused before it queues, and a job record read back is held to them too.
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


def check_limits(request) -> None:
    """`request` (a `VideoJobRequest`) against its declared types and bounds and `SERVER_LIMITS`: a ValueError
    naming the field. The HTTP schema checks posted requests the same way; this holds a restored record to it."""
    check_fields(request)
    for name, limits in SERVER_LIMITS.items():
        value = getattr(request, name)
        if value is None:
            continue
        if "max_length" in limits:
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {type(value).__name__}")
            if not limits.get("min_length", 0) <= len(value) <= limits["max_length"]:
                raise ValueError(f"{name} must be {limits.get('min_length', 0)} to {limits['max_length']} characters")
        else:
            check_field(name, value, type(value), {"low": limits.get("ge"), "high": limits.get("le")})


def job_cost(request: GenerationRequest) -> int:
    """An upper bound on what a resolved request costs, in pixel-frame steps: height × width × frames ×
    (denoising steps + 2 per guided update, a forward and a backward through the recorded blocks), a guided
    window left to the server's guidance counted as every step (its updates a step as one). The server's
    `--max-job-cost` bounds it, so no job holds the queue longer than its operator allows."""
    steps = request.num_inference_steps
    guided = 0
    if request.composition is not None:
        window = steps if request.guide_steps is None else min(request.guide_steps, steps)
        guided = window * (request.iterations or 1)
    return request.height * request.width * request.num_frames * (steps + 2 * guided)


@dataclass
class VideoResult:
    """One job's output: frames `[F, H, W, 3]` uint8, the entity maps of its last guided step `[f, h, w, E]`
    with the entities' names (None unguided), the run's timings."""

    frames: np.ndarray
    maps: np.ndarray | None
    entities: list[str]
    timings: dict[str, float]
    served_by: str = ""  # which engine replica ran it, where there are several


class Runner(Protocol):
    """What `JobQueue` runs jobs on: `EngineRunner` here, `cvg.serving.ray_serve.RayRunner` on replicas."""

    family: str

    def request(self, request: VideoJobRequest) -> GenerationRequest: ...
    def check(self, request: VideoJobRequest) -> None: ...
    def run(self, requests: list[VideoJobRequest], on_step) -> list[VideoResult]: ...


class EngineRunner:
    """Runs batches of jobs on an `Engine` in this process (the runner `JobQueue` takes)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.family = engine.pipe.family

    def request(self, request: VideoJobRequest) -> GenerationRequest:
        """What the job runs: the client's fields, the engine's settings for the rest."""
        return self.engine.request(**request.given())

    def check(self, request: VideoJobRequest) -> None:
        self.engine.check(self.request(request))

    def run(self, requests: list[VideoJobRequest], on_step) -> list[VideoResult]:
        """One denoising run for `requests` (of equal settings); `on_step(i)` after each step may raise to
        end it."""
        out = self.engine.generate_batch([self.request(r) for r in requests], on_step=lambda i, t, latents: on_step(i))
        return _results(out, [r.maps for r in requests])


def _results(out, maps: list[bool]) -> list[VideoResult]:
    """Each item of a batch's output as a job's result, with its maps picture's data where `maps` asks."""
    timings = {k: round(v, 4) for k, v in out.timings.items()}
    results = []
    for i, wanted in enumerate(maps):
        item_maps, entities = None, []
        if wanted and out.maps:
            bound = out.composition.items[i] if isinstance(out.composition, BoundBatch) else out.composition
            item_maps = bound.entity_maps(out.maps[-1][i : i + 1].mean(dim=(1, 2)))[0].numpy()  # layers, heads averaged
            entities = list(bound.composition.entities)
        results.append(VideoResult(to_uint8(out.frames[i]), item_maps, entities, timings))
    return results
