"""examples/serve_http.py on loopback: valid requests answer the engine's frames, bad ones one-line errors."""

import base64
import http.client
import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from cvg.request import PipelineOptions
from cvg.serving.service import Engine

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("serve_http", ROOT / "examples" / "serve_http.py")
serve_http = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(serve_http)
PROMPT, COMPOSITION = "a red cube to the left of a blue ball", "red cube left of blue ball"


@pytest.fixture(scope="module")
def server():
    engine = Engine(ROOT / "models" / "compshapes-wan", num_inference_steps=4, options=PipelineOptions())
    server = serve_http.Server(("127.0.0.1", 0), engine, max_inflight=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=120)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    answer = response.status, json.loads(response.read()), dict(response.getheaders())
    connection.close()
    return answer


def _post(server, payload) -> tuple[int, dict, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _request(server, "POST", "/generate", body, {"Content-Type": "application/json"})


def test_health(server):
    status, body, _ = _request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    assert (body["frames"], body["height"], body["width"]) == (17, 64, 64)


def test_generate_answers_the_engines_frames(server):
    status, body, _ = _post(server, {"prompt": PROMPT, "composition": COMPOSITION, "seed": 5})
    assert status == 200, body
    pixels = np.frombuffer(base64.b64decode(body["pixels"]), np.uint8).reshape(body["frames"], 64, 64, 3)
    expected, objective = serve_http.generate(server.engine, PROMPT, COMPOSITION, 5)
    np.testing.assert_array_equal(pixels, expected)
    guidance = server.engine.pipe.guidance  # training-free objective: every update is made
    assert body["objective"] == objective and len(objective) == guidance.guide_steps * guidance.iterations


def test_concurrent_requests_all_succeed(server):
    answers = [None] * 2

    def send(i):
        answers[i] = _post(server, {"prompt": PROMPT, "seed": i})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a[0] for a in answers] == [200, 200]
    assert answers[0][1]["pixels"] != answers[1][1]["pixels"]


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"{not json", 400, "the body is not JSON"),
        (b"[" * 30_000 + b"]" * 30_000, 400, "the body is not JSON we take: RecursionError"),
        (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", 400, "the body is not JSON we take: ValueError"),
        (b"\xff\xfe{}", 400, "the body is not JSON"),
        ([1, 2], 400, "the body must be a JSON object"),
        ({"prompt": ""}, 400, "prompt must be a non-empty string"),
        ({"prompt": PROMPT, "seed": -1}, 400, "seed must be an integer"),
        ({"prompt": PROMPT, "seed": True}, 400, "seed must be an integer"),
        ({"prompt": PROMPT, "steps": 100}, 400, "unknown fields: steps"),
        ({"prompt": PROMPT, "composition": 3}, 400, "composition must be a string or null"),
        (
            {"prompt": "a red cube", "composition": "purple cone left of red cube"},
            422,
            "'purple cone' is not in the prompt",
        ),
    ],
)
def test_bad_requests_get_one_line_errors(server, payload, status, message):
    got, body, _ = _post(server, payload)
    assert got == status
    assert message in body["error"] and "\n" not in body["error"]


def test_requests_beyond_the_limit_are_turned_away(server):
    # The two slots, as if in flight. Waiting for them: a handler frees its slot only after its client has
    # the answer, so the previous test's request may still hold one for a moment.
    taken = [server.slots.acquire(timeout=30) for _ in range(2)]
    try:
        assert all(taken)
        status, body, headers = _post(server, {"prompt": PROMPT})
        assert status == 503 and headers["Retry-After"] == "1" and "too many requests" in body["error"]
    finally:
        for _ in range(sum(taken)):
            server.slots.release()
    assert _post(server, {"prompt": PROMPT, "seed": 1})[0] == 200


def test_oversized_and_unknown_paths(server):
    assert _post(server, b"x" * (serve_http.MAX_BODY + 1))[0] == 413
    assert _request(server, "GET", "/nothing")[0] == 404


def test_a_stalled_client_times_out_and_a_500_tells_nothing_inside(server, monkeypatch):
    import socket
    import time

    monkeypatch.setattr(serve_http.Handler, "timeout", 0.5)
    stalled = socket.create_connection(("127.0.0.1", server.server_port))
    stalled.sendall(b"POST /generate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # then nothing
    start = time.monotonic()
    stalled.settimeout(30)
    assert stalled.recv(1024) == b""  # the server closed it
    assert time.monotonic() - start < 10
    stalled.close()

    def broken(*args):
        raise RuntimeError("secret path /srv/weights")

    monkeypatch.setattr(serve_http, "generate", broken)
    status, body, _ = _post(server, {"prompt": PROMPT})
    assert status == 500 and body == {"error": "internal error; see the server log"}


def test_connections_beyond_the_cap_are_closed():
    import socket

    engine = Engine.__new__(Engine)  # no generation happens: a stand-in that only /health reads
    engine.defaults = {"num_frames": 1, "height": 8, "width": 8}
    server = serve_http.Server(("127.0.0.1", 0), engine, max_inflight=1, max_connections=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        held = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(2)]
        extra = socket.create_connection(("127.0.0.1", server.server_port))
        extra.settimeout(10)
        assert extra.recv(1024) == b""  # closed without an answer
        for s in (*held, extra):
            s.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
