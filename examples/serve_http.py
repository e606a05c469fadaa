"""Serving `cvg.serving.service.Engine` over HTTP with the standard library only: validation and a concurrency limit.

    python examples/serve_http.py --model models/compshapes-wan --port 8000
    curl -s localhost:8000/generate -d '{"prompt": "a red cube to the left of a blue ball",
                                         "composition": "red cube left of blue ball", "seed": 0}'

POST /generate takes a JSON object {"prompt": str, "composition": str | null, "seed": int} and answers
{"frames", "height", "width", "objective", "pixels"}: `pixels` is base64 of frames x height x width x 3
RGB bytes. GET /health answers the engine's shape and backend. A malformed request gets 400, a request
the model cannot take (a composition word absent from the prompt) 422, and a request beyond the limit
of requests in flight gets 503 with Retry-After at once rather than queueing without bound. Every error
body is {"error": "<one line>"}; a 500 says no more than that (the detail goes to the server's log).
The engine runs one request at a time; the limit bounds the queue. A client has READ_TIMEOUT seconds
to send its request, and at most MAX_CONNECTIONS connections are open at once (more are closed).
"""

from __future__ import annotations

import argparse
import base64
import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cvg.request import PipelineOptions
from cvg.serving.cpp_api import generate, video_shape
from cvg.serving.service import Engine

MAX_BODY = 64 * 1024
READ_TIMEOUT = 10.0  # seconds a client may take to send its request: a stalled one cannot hold a thread
MAX_CONNECTIONS = 64  # open connections; more are closed at once
MAX_PROMPT = 2000
FIELDS = {"prompt", "composition", "seed"}


class BadRequest(ValueError):
    """The request itself is malformed (400), as opposed to one the model cannot take (422)."""


def parse_request(body: bytes) -> tuple[str, str, int]:
    """(prompt, composition or "", seed) from a request body, or BadRequest naming the problem."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep, a 5000-digit number
        raise BadRequest(f"the body is not JSON we take: {type(error).__name__}") from None
    if not isinstance(request, dict):
        raise BadRequest("the body must be a JSON object")
    if unknown := sorted(set(request) - FIELDS):
        raise BadRequest(f"unknown fields: {', '.join(unknown)} (expected {', '.join(sorted(FIELDS))})")
    prompt, composition, seed = request.get("prompt"), request.get("composition"), request.get("seed", 0)
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
        raise BadRequest(f"prompt must be a non-empty string of at most {MAX_PROMPT} characters")
    if composition is not None and not isinstance(composition, str):
        raise BadRequest("composition must be a string or null")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadRequest("seed must be an integer in [0, 2**63)")
    return prompt, composition or "", seed


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], engine: Engine, max_inflight: int, max_connections: int = MAX_CONNECTIONS
    ):
        super().__init__(address, Handler)
        self.engine = engine
        self.slots = threading.BoundedSemaphore(max_inflight)  # requests waiting or running
        self.connections = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self.connections.acquire(blocking=False):  # over the cap: no thread for it
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = READ_TIMEOUT  # socket timeout of each connection (StreamRequestHandler)

    def _reply(self, status: HTTPStatus, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/health":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
        frames, height, width = video_shape(self.server.engine)
        self._reply(
            HTTPStatus.OK,
            {"status": "ok", "backend": self.server.engine.backend, "frames": frames, "height": height, "width": width},
        )

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/generate":
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path!r}"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"})
        if not 0 < length <= MAX_BODY:
            return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the body must be 1..{MAX_BODY} bytes"})
        try:
            prompt, composition, seed = parse_request(self.rfile.read(length))
        except BadRequest as error:
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        if not self.server.slots.acquire(blocking=False):
            return self._reply(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": "too many requests in flight; retry later"},
                {"Retry-After": "1"},
            )
        try:
            frames, objective = generate(self.server.engine, prompt, composition, seed)
        except ValueError as error:  # the engine's one-line messages: absent words, too many tokens, ...
            return self._reply(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(error)})
        except Exception as error:  # a failure of the server's own: the client still gets a one-line answer
            self.log_error("generate failed: %r", error)  # the detail stays in the server's log
            return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; see the server log"})
        finally:
            self.server.slots.release()
        count, height, width, _ = frames.shape
        self._reply(
            HTTPStatus.OK,
            {
                "frames": count,
                "height": height,
                "width": width,
                "objective": objective,
                "pixels": base64.b64encode(frames.tobytes()).decode(),
            },
        )

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # a real deployment logs through its own logger; the example stays quiet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local diffusers WanPipeline directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-inflight", type=int, default=4, help="requests waiting or running before 503")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--step-backend", default="auto", help="step backend (auto, onnxruntime, compiled, torch)")
    args = parser.parse_args()
    engine = Engine(args.model, num_inference_steps=args.steps, options=PipelineOptions(step_backend=args.step_backend))
    server = Server((args.host, args.port), engine, args.max_inflight)
    print(f"serving {args.model} on http://{args.host}:{server.server_port} ({engine.backend})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
