"""The official `openai` client against `cvg serve` on loopback (the shipped model, its token from a file):
create_and_poll with cvg's composition in extra_body, download_content decoding to the frames asked, list,
retrieve, delete, the models list, the sync route, a wrong token answered as the client expects, and a
clean stop on SIGINT. Where the token comes from: `test_the_token_comes_from_a_file_the_environment_or_argv`."""

import argparse
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import imageio.v2 as imageio
import openai
import pytest
from processes import free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "compshapes-wan"
PROMPT, COMPOSITION = "a red cube to the left of a blue ball", "red cube left of blue ball"
TOKEN = "t0ken-from-a-file"
# The client marks its video methods deprecated: OpenAI's own video service is closing, not the API's shape.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openai")
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    command = [sys.executable, "-m", "cvg", "serve", "--model", str(MODEL), "--port", str(port), "--steps", "4"]
    command += ["--engine", "eager", "--out-dir", str(directory / "out"), "--token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k != "CVG_SERVE_TOKEN"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "cvg serve did not start"
            time.sleep(0.2)
    yield base
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, process.stderr.read()  # a clean stop on SIGINT


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0)


def test_create_and_poll_download_list_and_delete(client):
    video = client.videos.create_and_poll(
        prompt=PROMPT,
        model="compshapes-wan",
        size="64x64",
        seconds="1",
        extra_body={"composition": COMPOSITION, "seed": 3},
        poll_interval_ms=100,
    )
    assert video.status == "completed" and video.progress == 100 and video.error is None, video
    assert (video.size, video.seconds, video.model, video.object) == ("64x64", "1", "compshapes-wan", "video")
    assert video.model_extra["composition"] == COMPOSITION and video.model_extra["seed"] == 3
    frames = imageio.mimread(io.BytesIO(client.videos.download_content(video.id).read()), format="mp4")
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)  # 1 s at 16 fps: 17 frames
    assert client.videos.download_content(video.id, variant="thumbnail").read()[:4] == b"\x89PNG"
    assert video.id in [v.id for v in client.videos.list(limit=10)]
    assert client.videos.retrieve(video.id).status == "completed"
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_the_models_list_and_refusals_are_what_the_client_expects(client, server):
    assert [m.id for m in client.models.list()] == ["compshapes-wan"]
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.videos.create(prompt=PROMPT, model="sora-2")
    with pytest.raises(openai.UnprocessableEntityError, match="'green ball' is not in the prompt"):
        client.videos.create(prompt=PROMPT, extra_body={"composition": "red cube left of green ball"})
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.videos.list()


def test_the_sync_route_answers_with_the_mp4(server):
    answer = httpx.post(
        f"{server}/v1/videos/sync",
        json={"prompt": PROMPT, "composition": COMPOSITION, "seconds": 1},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4"
    assert len(imageio.mimread(io.BytesIO(answer.content), format="mp4")) == 17


def test_the_token_comes_from_a_file_the_environment_or_argv(tmp_path, monkeypatch, capsys):
    from cvg.cli.serving import TOKEN_VARIABLE, _token

    def args(**given):
        return argparse.Namespace(**{"token": None, "token_file": None, **given})

    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    assert _token(args()) is None
    (tmp_path / "token").write_text("from-a-file\n")
    assert _token(args(token_file=str(tmp_path / "token"))) == "from-a-file"
    monkeypatch.setenv(TOKEN_VARIABLE, "from-the-environment")
    assert _token(args()) == "from-the-environment"
    assert _token(args(token="on-argv")) == "on-argv"
    assert "readable by any local user in the process list" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        _token(args(token_file=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="cannot read it"):
        _token(args(token_file=str(tmp_path / "missing")))
