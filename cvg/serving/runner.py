"""What a job asks for (`VideoJobRequest`, derived from `cvg.request.GenerationRequest`), what it gives back
(`VideoResult`), and the runner that runs jobs on an `Engine` in this process (`EngineRunner`; Ray replicas
elsewhere: `cvg.serving.ray_serve`)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, make_dataclass

import numpy as np

from cvg.guidance.binding import BoundBatch
from cvg.io.video import to_uint8
from cvg.request import GenerationRequest, documented
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
    + [("maps", "bool", documented(False, "also write the maps picture of the last guided step"))],
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": "What a client asks for: `GenerationRequest`'s fields (None: the server's setting, else the "
        "declaration's default), and whether to keep the maps picture.",
        "given": lambda self: {k: getattr(self, k) for k in SERVED_FIELDS if getattr(self, k) is not None},
    },
)


@dataclass
class VideoResult:
    """One job's output: frames `[F, H, W, 3]` uint8, the entity maps of its last guided step `[f, h, w, E]`
    with the entities' names (None unguided), the run's timings."""

    frames: np.ndarray
    maps: np.ndarray | None
    entities: list[str]
    timings: dict[str, float]
    served_by: str = ""  # which engine replica ran it, where there are several


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
            item_maps = bound.entity_maps(out.maps[-1][i : i + 1].mean(dim=(1, 2)))[0].numpy()  # layers, heads
            entities = list(bound.composition.entities)
        results.append(VideoResult(to_uint8(out.frames[i]), item_maps, entities, timings))
    return results
