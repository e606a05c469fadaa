"""Nothing lost: outputs never delete a user's files, temporary names never clash, cached files are verified."""

import os
import threading

import numpy as np
import pytest
from PIL import Image

from cvg.io.files import atomic_path, check_writable, record_digest, verified
from cvg.io.video import check_output, check_separate, save_frames

FRAMES = np.random.default_rng(0).random((5, 16, 16, 3)).astype(np.float32)


def test_frames_into_a_folder_with_other_files_are_refused_and_nothing_is_touched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="is not empty"):
        save_frames(FRAMES, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "sub" / "data.bin").stat().st_size == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "sub"]  # no temporary folder left


def test_working_directory_is_never_emptied(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work.py").write_text("print(1)")
    with pytest.raises(ValueError, match="is not empty"):
        save_frames(FRAMES, ".")
    assert (tmp_path / "work.py").read_text() == "print(1)"


def test_frames_replace_an_earlier_write_and_only_it(tmp_path):
    out = tmp_path / "frames"
    save_frames(FRAMES, out)
    save_frames(FRAMES[:3] * 0, out)  # fewer frames: the earlier ones are gone, not mixed in
    names = sorted(p.name for p in out.iterdir())
    assert names == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert np.asarray(Image.open(out / names[0])).max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


@pytest.mark.parametrize("name, message", [("clip.avi", "unknown video format"), ("clip.mp4/", "is a directory")])
def test_outputs_that_cannot_be_written_as_asked_are_refused(tmp_path, name, message):
    if name.endswith("/"):
        (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=message):
        check_output(tmp_path / name)


def test_an_existing_file_is_not_turned_into_a_frames_folder(tmp_path):
    (tmp_path / "frames").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        save_frames(FRAMES, tmp_path / "frames")
    assert (tmp_path / "frames").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder_is_refused_before_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="not writable"):
        check_writable(locked / "out.mp4")


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        check_output(tmp_path / "file" / "out.mp4")


def test_concurrent_atomic_writes_of_one_file_never_share_a_temporary(tmp_path):
    """Eight writers of one path: each temporary is its own, and the file ends as one writer's whole text."""
    target, seen, errors = tmp_path / "out.txt", [], []

    def write(i: int) -> None:
        try:
            for _ in range(20):
                with atomic_path(target) as tmp:
                    seen.append(tmp)
                    tmp.write_text(str(i) * 1000)
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(seen)) == len(seen) == 160
    text = target.read_text()
    assert len(text) == 1000 and len(set(text)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_recorded_digest_verifies_only_the_content_written(tmp_path):
    path = tmp_path / "engine.onnx"
    path.write_bytes(bytes(range(256)) * 64)
    assert not verified(path)  # no record yet
    record_digest(path)
    assert verified(path)
    data = bytearray(path.read_bytes())
    data[4096:8192] = bytes(b ^ 0xFF for b in data[4096:8192])  # same size, bytes flipped
    path.write_bytes(bytes(data))
    assert not verified(path)


def test_nothing_is_unpickled():
    """Every torch.load passes weights_only=True, np.load never allow_pickle, and no module imports pickle."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offences = []
    for path in [
        *root.glob("cvg/**/*.py"),
        *root.glob("kernels/*.py"),
        *root.glob("examples/*.py"),
        *root.glob("benchmarks/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                offences += [f"{path.name}: imports {n}" for n in names if n.split(".")[0] in ("pickle", "dill")]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                keywords = {k.arg: k.value for k in node.keywords}
                owner = getattr(node.func.value, "id", "")
                if (owner, node.func.attr) == ("torch", "load"):
                    safe = keywords.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        offences.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
                if (owner, node.func.attr) == ("np", "load") and "allow_pickle" in keywords:
                    offences.append(f"{path.name}:{node.lineno}: np.load with allow_pickle")
    assert not offences, offences


def test_written_files_keep_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "clip.npz") as tmp:
            np.savez_compressed(tmp, frames=FRAMES)
        save_frames(FRAMES, tmp_path / "clip.gif")
    finally:
        os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}


def test_a_link_to_the_users_frames_is_refused_and_their_frames_stay(tmp_path):
    mine = tmp_path / "mine"
    save_frames(FRAMES, mine)  # a folder of frames the user keeps
    (tmp_path / "link").symlink_to(mine, target_is_directory=True)
    with pytest.raises(ValueError, match="is a symbolic link"):
        save_frames(FRAMES, tmp_path / "link")
    assert len(list(mine.iterdir())) == len(FRAMES) and (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "mine"]  # nothing set aside


@pytest.mark.parametrize("name", ["pipe", "pipe.mp4"])
def test_a_pipe_is_never_taken_for_an_output(tmp_path, name):
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match="is not a regular file"):
        save_frames(FRAMES, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_folder_named_like_a_frame_is_not_an_earlier_frame(tmp_path):
    out = tmp_path / "frames"
    (out / "frame_0000.png").mkdir(parents=True)
    (out / "frame_0000.png" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty .*'frame_0000.png'"):
        save_frames(FRAMES, out)
    assert (out / "frame_0000.png" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


def test_outputs_that_name_one_place_are_refused(tmp_path):
    (tmp_path / "real.png").write_bytes(b"")
    (tmp_path / "alias.png").symlink_to(tmp_path / "real.png")
    check_separate({"--out": tmp_path / "a.mp4", "--save-maps": tmp_path / "b.png", "--contact-sheet": None})
    for out, maps in (
        ("x.mp4", "x.mp4"),
        ("real.png", "alias.png"),  # through a link
        ("frames", "frames/maps.png"),  # inside the frames folder
    ):
        with pytest.raises(ValueError, match="--out and --save-maps name the same place"):
            check_separate({"--out": tmp_path / out, "--save-maps": tmp_path / maps})
