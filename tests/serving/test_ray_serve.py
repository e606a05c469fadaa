"""`cvg serve` on Ray Serve, on a local Ray cluster on this CPU: two generator replicas serve 8 concurrent
jobs through the same HTTP API, a generator replica killed mid-job loses no job silently, and the ingress
killed mid-job comes back (Serve restarts it) with its jobs, read from their records."""

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio.v2 as imageio
import pytest
from processes import free_port

ray = pytest.importorskip("ray", reason="Ray Serve is cvg's optional 'serve' extra (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from cvg.serving.ray_serve import build_app  # noqa: E402

MODEL = Path(__file__).resolve().parents[2] / "models" / "compshapes-wan"
PROMPTS = [
    ("a red cube to the left of a blue ball", "red cube left of blue ball"),
    ("a blue ball moves right", "blue ball moves right"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out = tmp_path_factory.mktemp("ray-out")
    engine = {"num_inference_steps": 8, "backend": None, "threads": 1}  # 2 replicas x 1 thread on 2 cores
    serve.run(build_app(str(MODEL), str(out), replicas=2, engine_options=engine), name="cvg", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _submit(base: str, i: int) -> str:
    prompt, composition = PROMPTS[i % 2]
    answer = httpx.post(f"{base}/v1/videos", json={"prompt": prompt, "composition": composition, "seed": i}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def _finished(base: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (view := httpx.get(f"{base}/v1/videos/{job_id}", timeout=60).json())["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, f"job {job_id} still {view['status']}"
        time.sleep(0.2)
    return view


def _actors(kind: str) -> list[dict]:
    """The live Serve replicas of deployment `kind` (actors named SERVE_REPLICA::app#deployment#<id>)."""
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{kind}#" in a["name"]]


def _kill(actor: dict) -> None:
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


def _running(base: str, ids: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(httpx.get(f"{base}/v1/videos/{i}", timeout=60).json()["steps"]["done"] for i in ids):
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.05)


def test_two_replicas_serve_eight_concurrent_jobs(cluster):
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: _submit(cluster, i), range(8)))
        views = list(pool.map(lambda job_id: _finished(cluster, job_id), ids))
    assert [v["status"] for v in views] == ["completed"] * 8, [v["error"] for v in views]
    assert len({v["served_by"] for v in views}) == 2  # both replicas took jobs
    for job_id in ids[:2]:
        content = httpx.get(f"{cluster}/v1/videos/{job_id}/content", timeout=60).content
        assert len(imageio.mimread(io.BytesIO(content), format="mp4")) == 17
    assert httpx.get(f"{cluster}/healthz", timeout=60).json()["family"] == "wan2.1"


def test_a_replica_killed_mid_job_loses_no_job_silently(cluster):
    ids = [_submit(cluster, i) for i in range(2)]
    _running(cluster, ids)
    replicas = _actors("VideoGenerator")
    assert len(replicas) == 2
    _kill(replicas[0])
    killed = replicas[0]["name"].rsplit("#", 1)[-1]  # SERVE_REPLICA::app#deployment#<replica id>
    views = [_finished(cluster, job_id) for job_id in ids]
    for view in views:  # each job either ran again elsewhere or failed saying why; none hangs or vanishes
        assert view["status"] == "completed" or (
            view["status"] == "failed" and "the generator replica died" in view["error"]["message"]
        ), view
    assert sum(v["status"] == "completed" for v in views) >= 1
    assert all(v["served_by"] != killed for v in views if v["status"] == "completed")  # the retry ran elsewhere
    for view in views:
        if view["status"] == "completed":
            content = httpx.get(f"{cluster}/v1/videos/{view['id']}/content", timeout=60).content
            assert len(imageio.mimread(io.BytesIO(content), format="mp4")) == 17


def test_the_ingress_killed_mid_job_comes_back_with_its_jobs(cluster):
    done, job = _submit(cluster, 2), _submit(cluster, 3)
    assert _finished(cluster, done)["status"] == "completed"
    _running(cluster, [job])
    (ingress,) = _actors("VideoApi")
    _kill(ingress)  # the job table goes with it; the records on disk stay
    deadline = time.monotonic() + 180
    while True:  # the proxy has no ingress (5xx, or no answer) until Serve has started another
        try:
            answer = httpx.get(f"{cluster}/v1/videos/{job}", timeout=10)
            if answer.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "Serve never brought the ingress back"
        time.sleep(0.5)
    assert [a["name"] for a in _actors("VideoApi")] != [ingress["name"]]
    view = _finished(cluster, job)
    assert view["status"] == "completed", view  # run again from its first step by the new ingress
    assert _finished(cluster, done)["status"] == "completed"  # the finished job is served from its record
    for job_id in (done, job):
        content = httpx.get(f"{cluster}/v1/videos/{job_id}/content", timeout=60).content
        assert len(imageio.mimread(io.BytesIO(content), format="mp4")) == 17
