"""Load and fault test of `cvg serve` on loopback, on the shipped model (64x64x17, 20 steps, guided with its
classifier): N jobs from M concurrent clients (each: POST, poll, fetch the mp4, decode it), reporting
throughput, p50/p99 latency (submission to decoded content), jobs lost (accepted, never succeeded) and
outputs that fail to decode or have the wrong frame count; with and without batching; and faults beside the
load: a client that drops its connection halfway through a request body, and one that drops it halfway
through a download. Also the batching bar: the same 4 jobs one by one against 4 at once.

    python benchmarks/serve_load.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import imageio.v2 as imageio

from cvg.measure import machine_line, publish
from cvg_research.compshapes.dataset import split_clip
from cvg_research.compshapes.grammar import CATEGORIES

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 17


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cvg serve` in a child process on a free loopback port, stopped (SIGINT) on exit."""

    def __init__(self, max_batch: int, queue: int, out: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "cvg", "serve", "--model", str(ROOT / "models" / "compshapes-wan")]
        command += ["--classifier", str(ROOT / "models" / "compshapes-classifier"), "--engine", "eager"]
        command += ["--port", str(self.port), "--max-batch", str(max_batch), "--queue-size", str(queue)]
        command += ["--out-dir", str(out)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cvg serve exited: {self.process.stderr.read()[-500:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("cvg serve did not start in 300 s")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _requests(count: int) -> list[dict]:
    clips = [split_clip(20_261_124, i, CATEGORIES[i % len(CATEGORIES)], "dev") for i in range(1, count + 1)]
    return [{"prompt": c.prompt, "composition": c.composition.describe(), "seed": i} for i, c in enumerate(clips)]


def _job(base: str, request: dict, timeout: float = 600) -> dict:
    """One client's job: submit (retrying on 429), poll, fetch and decode. What happened, and when."""
    start = time.perf_counter()
    with httpx.Client(base_url=base, timeout=60) as client:
        while (answer := client.post("/v1/videos", json=request)).status_code == 429:
            time.sleep(float(answer.headers.get("retry-after", 1)))
        if answer.status_code != 200:
            return {"accepted": False, "error": answer.text}
        job_id, deadline = answer.json()["id"], time.monotonic() + timeout
        while (view := client.get(f"/v1/videos/{job_id}").json())["status"] in ("queued", "in_progress"):
            if time.monotonic() > deadline:
                return {"accepted": True, "status": "timeout"}
            time.sleep(0.05)
        result = {"accepted": True, "status": view["status"], "batch": view["timings"].get("batch")}
        if view["status"] == "completed":
            content = client.get(f"/v1/videos/{job_id}/content").content
            try:
                result["decoded"] = len(imageio.mimread(io.BytesIO(content), format="mp4")) == FRAMES
            except Exception:
                result["decoded"] = False
        result["seconds"] = time.perf_counter() - start
        return result


def _drop_mid_body(port: int) -> None:
    """A client that promises a body, sends half of it, and hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
        )
        s.sendall(b'{"prompt": "a red cube to the left of a blue ball", "comp')


def _drop_mid_download(base: str, request: dict) -> None:
    """A client whose job succeeds and who hangs up after the first bytes of its video."""
    with httpx.Client(base_url=base, timeout=60) as client:
        job_id = client.post("/v1/videos", json={**request, "seed": 999}).json()["id"]
        while client.get(f"/v1/videos/{job_id}").json()["status"] in ("queued", "in_progress"):
            time.sleep(0.1)
        with client.stream("GET", f"/v1/videos/{job_id}/content") as response:
            next(response.iter_bytes(256))


def _load(base: str, requests: list[dict], clients: int, faults: bool) -> tuple[dict, float]:
    start = time.perf_counter()
    fault_threads = []
    if faults:
        port = int(base.rsplit(":", 1)[1])
        fault_threads = [
            threading.Thread(target=_drop_mid_body, args=(port,)),
            threading.Thread(target=_drop_mid_download, args=(base, requests[0])),
        ]
        for thread in fault_threads:
            thread.start()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda r: _job(base, r), requests))
    wall = time.perf_counter() - start
    for thread in fault_threads:
        thread.join()
    seconds = sorted(r["seconds"] for r in results if "seconds" in r)
    summary = {
        "jobs": len(requests),
        "clients": clients,
        "throughput": len(requests) / wall,
        "p50": statistics.median(seconds),
        "p99": seconds[min(len(seconds) - 1, round(0.99 * (len(seconds) - 1)))],
        "lost": sum(1 for r in results if not r["accepted"] or r["status"] != "completed"),
        "corrupted": sum(1 for r in results if r.get("status") == "completed" and not r["decoded"]),
        "batches": max((r.get("batch") or 0) for r in results),
    }
    return summary, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs per load run (default 16)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--write", type=Path, help="record the tables in this Markdown file")
    args = parser.parse_args()
    requests = _requests(args.jobs)
    rows, bar = [], {}
    for max_batch in (1, 4):
        with Server(
            max_batch, queue=2 * args.jobs, out=Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-load-{max_batch}"
        ) as server:
            _job(server.base, requests[0])  # warm-up
            summary, _ = _load(server.base, requests, args.clients, faults=True)
            rows.append((max_batch, summary))
            if max_batch == 4:  # the batching bar: the same 4 jobs one by one, then at once
                four = requests[:4]
                start = time.perf_counter()
                for request in four:
                    _job(server.base, request)
                bar["one by one"] = time.perf_counter() - start
                _, bar["at once"] = _load(server.base, four, 4, faults=False)
    lines = [
        f"`cvg serve` under load on loopback, {machine_line()}: the shipped generator and classifier, 64x64x17, "
        f"20 steps, CFG 5, guided at the defaults, eager forwards; {args.jobs} jobs from {args.clients} "
        "concurrent clients (each: submit, poll every 50 ms, fetch, decode), beside a client that hangs up "
        "halfway through a request body and one that hangs up halfway through a download.",
        "",
        "| max batch | jobs | throughput (jobs/s) | p50 latency (s) | p99 latency (s) | largest batch | lost | "
        "corrupted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for max_batch, s in rows:
        lines.append(
            f"| {max_batch} | {s['jobs']} | {s['throughput']:.3f} | {s['p50']:.2f} | {s['p99']:.2f} | "
            f"{s['batches']} | {s['lost']} | {s['corrupted']} |"
        )
    ratio = bar["one by one"] / bar["at once"]
    lines += [
        "",
        f"The same 4 jobs with --max-batch 4: one by one {bar['one by one']:.2f} s, all 4 at once "
        f"{bar['at once']:.2f} s: {ratio:.2f}x the throughput.",
    ]
    publish("Command: `python benchmarks/serve_load.py`\n\n" + "\n".join(lines), args.write, "serve_load")


if __name__ == "__main__":
    main()
