"""The OpenAI-shaped video API and the queue's bounds, on a stand-in runner (no model: each step is a sleep):
forms and JSON, size and seconds against cvg's own fields, the model's name, listing, the sync route,
content that is gone, the cost and time limits, and job records that must not run again."""

import io
import json
import threading
import time

import imageio.v2 as imageio
import pytest
from fastapi.testclient import TestClient
from stub_runner import StubRunner

from cvg.serving.api import create_app
from cvg.serving.jobs import MAX_ATTEMPTS, JobQueue

JOB = {"prompt": "a red cube to the left of a blue ball", "composition": "red cube left of blue ball"}


@pytest.fixture
def served(tmp_path):
    jobs = JobQueue(StubRunner(), tmp_path / "out", max_cost_ratio=16)
    yield jobs, TestClient(create_app(jobs, model_name="stub-wan", sync_seconds=30))
    jobs.close(timeout=30)


def _wait(client, video_id: str) -> dict:
    deadline = time.monotonic() + 30
    while (view := client.get(f"/v1/videos/{video_id}").json())["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, view
        time.sleep(0.02)
    return view


def _frames(content: bytes) -> list:
    return imageio.mimread(io.BytesIO(content), format="mp4")


def test_a_form_post_in_openais_words_makes_the_video_it_names(served):
    _, client = served
    form = {"prompt": JOB["prompt"], "model": "stub-wan", "size": "64x32", "seconds": "1", "fps": "8"}
    answer = client.post("/v1/videos", data={**form, "composition": JOB["composition"], "seed": "7", "maps": "false"})
    assert answer.status_code == 200, answer.text
    video = _wait(client, answer.json()["id"])
    assert (video["status"], video["size"], video["seconds"], video["model"]) == ("completed", "64x32", "1", "stub-wan")
    assert video["num_frames"] == 9 and video["fps"] == 8 and video["seed"] == 7  # 1 s at 8 fps: 8 + 1 frames
    frames = _frames(client.get(f"/v1/videos/{video['id']}/content").content)
    assert len(frames) == 9 and frames[0].shape == (32, 64, 3)


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"size": "64x32", "width": 48}, 422, "size 64x32 means width 64, but width is 48"),
        ({"seconds": 2, "num_frames": 9}, 422, "seconds 2 at 16 fps means num_frames 33, but num_frames is 9"),
        ({"seconds": 0.3}, 422, "seconds 0.3 at 16 fps is not a whole number of frames"),
        ({"size": "64 by 32"}, 422, 'size must be "WIDTHxHEIGHT"'),
        ({"model": "sora-2"}, 404, "model 'sora-2' is not served here; this server serves 'stub-wan'"),
        ({"num_frames": 10}, 422, "num_frames must be 4k+1"),
        ({"fps": 0}, 422, "fps: Input should be greater than or equal to 1"),
        ({"num_inference_steps": True}, 422, "num_inference_steps: Input should be a valid integer"),
        ({"maps": "yes"}, 422, "maps: Input should be a valid boolean"),
    ],
)
def test_two_spellings_that_disagree_and_other_models_are_refused(served, fields, status, message):
    _, client = served
    answer = client.post("/v1/videos", json={**JOB, **fields})
    assert answer.status_code == status and message in answer.json()["error"]["message"], answer.text


def test_a_form_with_a_file_is_refused_in_one_line(served):
    _, client = served
    answer = client.post(
        "/v1/videos", data={"prompt": "p"}, files={"input_reference": ("a.png", b"\x89PNG", "image/png")}
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["message"] == "input_reference: cvg makes videos from text; it takes no file"


def test_videos_are_listed_newest_first_a_page_at_a_time(served):
    _, client = served
    ids = [client.post("/v1/videos", json={**JOB, "seed": seed}).json()["id"] for seed in range(3)]
    for video_id in ids:
        _wait(client, video_id)
    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert [v["id"] for v in page["data"]] == ids[::-1][:2] and page["has_more"] and page["object"] == "list"
    rest = client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["id"] for v in rest["data"]] == ids[:1] and not rest["has_more"]
    oldest = client.get("/v1/videos", params={"order": "asc", "limit": 1}).json()
    assert oldest["first_id"] == ids[0]
    assert client.get("/v1/videos", params={"limit": 0}).status_code == 422


def test_the_sync_route_answers_with_the_video(served):
    _, client = served
    answer = client.post("/v1/videos/sync", json={**JOB, "size": "32x32"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4"
    assert len(_frames(answer.content)) == 9
    assert client.get(f"/v1/videos/{answer.headers['x-video-id']}").json()["status"] == "completed"


def test_a_sync_request_past_its_wait_is_504_naming_the_video(tmp_path):
    jobs = JobQueue(StubRunner(step_seconds=0.5), tmp_path / "out")
    client = TestClient(create_app(jobs, sync_seconds=0.2))
    try:
        answer = client.post("/v1/videos/sync", json=JOB)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        assert "poll it" in answer.json()["error"]["message"]
    finally:
        jobs.close(timeout=30)


def test_content_whose_file_is_gone_is_410(served):
    jobs, client = served
    video = _wait(client, client.post("/v1/videos", json=JOB).json()["id"])
    (jobs.directory / f"{video['id']}.mp4").unlink()
    answer = client.get(f"/v1/videos/{video['id']}/content")
    assert answer.status_code == 410 and "is gone" in answer.json()["error"]["message"]
    thumbnail = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"


def test_a_job_costing_more_than_the_limit_is_refused_naming_it(served):
    _, client = served  # the default guided job: 32 x 48 x 9 frames x (4 steps + 2 x 4 updates)
    answer = client.post("/v1/videos", json={**JOB, "size": "512x512", "num_frames": 161})
    error = answer.json()["error"]
    assert answer.status_code == 422 and error["code"] == "job_too_costly"
    assert "times this server's default guided job" in error["message"] and "at most 16 times" in error["message"]
    assert client.post("/v1/videos", json={**JOB, "size": "64x64"}).status_code == 200  # under the limit


def test_a_job_past_its_time_limit_fails_and_the_next_one_runs(tmp_path):
    jobs = JobQueue(StubRunner(step_seconds=0.3), tmp_path / "out", job_timeout=0.5)
    client = TestClient(create_app(jobs))
    try:
        slow = client.post("/v1/videos", json={**JOB, "num_inference_steps": 50}).json()
        quick = client.post("/v1/videos", json={**JOB, "num_inference_steps": 1}).json()
        view = _wait(client, slow["id"])
        assert view["status"] == "failed" and "time limit of 0.5 s" in view["error"]["message"]
        assert view["steps"]["done"] < 5
        assert _wait(client, quick["id"])["status"] == "completed"
    finally:
        jobs.close(timeout=30)


def _record(job_id: str, **fields) -> str:
    record = {"id": job_id, "status": "running", "total": 4, "created": time.time(), "started": time.time()}
    record |= {"finished": None, "error": None, "timings": {}, "served_by": "", "files": [], "attempts": 1}
    return json.dumps({**record, "request": {"prompt": JOB["prompt"]}, **fields})


def test_a_job_that_stopped_its_server_twice_is_failed_not_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    poison, again, oversized = "a" * 32, "b" * 32, "c" * 32
    (out / f"{poison}.job.json").write_text(_record(poison, attempts=MAX_ATTEMPTS))
    (out / f"{again}.job.json").write_text(_record(again, attempts=MAX_ATTEMPTS - 1))
    (out / f"{oversized}.job.json").write_text(_record(oversized, request={"prompt": "p", "height": 4096}))
    (out / f"{'d' * 32}.job.json").write_text(_record("d" * 32, admitted=True))  # no record can say so
    runner = StubRunner()
    with pytest.warns(UserWarning, match="fields a job record has not: admitted"):
        jobs = JobQueue(runner, out)
    client = TestClient(create_app(jobs))
    try:
        failed = client.get(f"/v1/videos/{poison}").json()
        assert failed["status"] == "failed" and "stopped while running it, 2 times" in failed["error"]["message"]
        assert _wait(client, again)["status"] == "completed"  # a second attempt is allowed
        refused = _wait(client, oversized)
        assert refused["status"] == "failed" and "height must be between 1 and 1280" in refused["error"]["message"]
        assert json.loads((out / f"{again}.job.json").read_text())["attempts"] == MAX_ATTEMPTS
    finally:
        jobs.close(timeout=30)


def test_many_clients_at_once_each_get_their_own_video(served):
    _, client = served
    answers = []

    def post(seed: int) -> None:
        answers.append(client.post("/v1/videos", json={**JOB, "seed": seed}).json()["id"])

    threads = [threading.Thread(target=post, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(answers)) == 8 and all(_wait(client, i)["status"] == "completed" for i in answers)
