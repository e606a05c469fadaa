"""`cvg serve`'s connection guards on a real socket (uvicorn, loopback, a stand-in runner): half-open
connections are closed at their head deadline and cannot crowd out /healthz, a body that stops arriving is
408, and the connection cap stays under the process's file limit."""

import resource
import socket
import time

import httpx
import pytest
from stub_runner import StubRunner, serving

from cvg.serving import http
from cvg.serving.api import create_app
from cvg.serving.http import guarded_protocol
from cvg.serving.jobs import JobQueue

HALF_A_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no blank line: the head never ends


@pytest.fixture
def app(tmp_path):
    jobs = JobQueue(StubRunner(), tmp_path / "out")
    yield create_app(jobs, body_seconds=0.5)
    jobs.close(timeout=30)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_a_connection_that_never_finishes_its_head_is_closed_at_the_deadline(app):
    with serving(app, guarded_protocol(head_seconds=0.5, max_connections=50)) as base:
        stalled = socket.create_connection(("127.0.0.1", _port(base)))
        stalled.sendall(HALF_A_HEAD)
        stalled.settimeout(10)
        start = time.monotonic()
        assert stalled.recv(1024) == b""  # closed without an answer
        assert 0.4 < time.monotonic() - start < 5
        stalled.close()
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200


def test_200_half_open_connections_do_not_starve_health(app):
    """The cap (here 50, as a low file limit would set it) closes the connection that has waited longest for
    its head: the attackers' sockets make room for /healthz, and no descriptor runs out."""
    with serving(app, guarded_protocol(head_seconds=30, max_connections=50)) as base:
        held = []
        try:
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", _port(base)))
                s.sendall(HALF_A_HEAD)
                held.append(s)
            start = time.monotonic()
            for _ in range(5):
                assert httpx.get(f"{base}/healthz", timeout=5).json()["status"] == "ok"
            assert time.monotonic() - start < 5
            closed = 0
            for s in held[:150]:  # the oldest were closed to make room
                s.settimeout(5)
                closed += s.recv(1024) == b""
            assert closed == 150
        finally:
            for s in held:
                s.close()


def test_a_body_that_stops_arriving_is_408(app):
    with serving(app, guarded_protocol(head_seconds=5, max_connections=50)) as base:
        stalled = socket.create_connection(("127.0.0.1", _port(base)))
        head = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        stalled.sendall(head + b'{"prompt": ')  # 11 of 1,000 bytes, then nothing
        stalled.settimeout(10)
        start = time.monotonic()
        answer = stalled.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"stopped arriving for 0.5 s" in answer
        assert time.monotonic() - start < 5
        stalled.close()


def test_the_connection_cap_leaves_room_under_the_file_limit(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (128, 4096))
    assert http.connection_cap() == 128 - http.SPARE_DESCRIPTORS
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert http.connection_cap() == 1000
    with pytest.raises(ValueError, match="head_seconds must be positive"):
        guarded_protocol(head_seconds=0)


def test_a_download_slower_than_the_body_deadline_is_not_cut(tmp_path):
    """The body deadline covers the request's body only: a response read slowly, for longer than it (a file
    larger than the socket buffers, so the server waits on the reader), arrives whole."""
    jobs = JobQueue(StubRunner(), tmp_path / "out")
    app = create_app(jobs, body_seconds=0.2)
    try:
        with serving(app, guarded_protocol(head_seconds=5, max_connections=50)) as base:
            job = httpx.post(f"{base}/v1/videos", json={"prompt": "a red cube"}).json()
            while httpx.get(f"{base}/v1/videos/{job['id']}").json()["status"] != "completed":
                time.sleep(0.05)
            size = 32 << 20
            (tmp_path / "out" / f"{job['id']}.mp4").write_bytes(bytes(size))  # a long video, as far as HTTP goes
            got, start = 0, time.monotonic()
            with httpx.stream("GET", f"{base}/v1/videos/{job['id']}/content") as response:
                for chunk in response.iter_bytes(1 << 20):
                    got += len(chunk)
                    time.sleep(0.04)  # about 1.3 s in all: six body deadlines
            assert response.status_code == 200 and got == size and time.monotonic() - start > 1.0
    finally:
        jobs.close(timeout=30)
