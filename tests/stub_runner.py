"""A stand-in for a model behind `cvg serve`: `StubRunner` (each step a sleep, each video grey frames of the
asked size) and `serving(app, protocol)`, uvicorn on a loopback port in a thread. The serving tests use them
where the model's work is beside the point: the API's shape, the queue's bounds, the connection guards."""

import threading
import time
from contextlib import contextmanager

import numpy as np
import uvicorn
from processes import free_port

from cvg.request import GenerationRequest
from cvg.serving.runner import VideoResult


class StubRunner:
    """A runner of `steps` steps of `step_seconds` each, whose videos are grey frames of the asked size."""

    family = "stub"

    def __init__(self, step_seconds: float = 0.0):
        self.step_seconds = step_seconds

    def request(self, request) -> GenerationRequest:
        defaults = {"height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 4}
        return GenerationRequest(**{**defaults, **request.given()})

    def check(self, request) -> None:
        if self.request(request).num_frames % 4 != 1:
            raise ValueError("num_frames must be 4k+1")

    def run(self, requests, on_step) -> list[VideoResult]:
        resolved = [self.request(r) for r in requests]
        for i in range(resolved[0].num_inference_steps):
            time.sleep(self.step_seconds)
            on_step(i)
        return [
            VideoResult(np.full((r.num_frames, r.height, r.width, 3), 128, np.uint8), None, [], {"total": 0.0})
            for r in resolved
        ]


@contextmanager
def serving(app, protocol="h11"):
    """`app` served by uvicorn on a free loopback port (in a thread), with `protocol`; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
