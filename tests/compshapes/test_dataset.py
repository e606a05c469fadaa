"""Dataset directories keep every record: corrupt indexes named, one writer at a time, resumes that match, kills."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from processes import kill_when

from cvg_research.compshapes.dataset import INDEX, ClipWriter, DatasetError, read_frames, read_index, write_dataset


def test_a_corrupt_line_is_named_and_no_record_after_it_is_dropped(tmp_path):
    write_dataset(tmp_path, 4, seed=1)
    lines = (tmp_path / INDEX).read_text().splitlines(keepends=True)
    lines[1] = '{"id": 1, "file": "clips/000001.np\n'  # damaged in the middle
    (tmp_path / INDEX).write_text("".join(lines))
    with pytest.raises(DatasetError, match=r"index.jsonl:2: not a JSON record"):
        read_index(tmp_path)
    with pytest.raises(DatasetError, match=r"index.jsonl:2"):  # a resumed write refuses too ...
        write_dataset(tmp_path, 6, seed=1)
    assert (tmp_path / INDEX).read_text() == "".join(lines)  # ... and rewrites nothing


def test_a_torn_last_line_is_an_interrupted_write_and_is_written_again(tmp_path):
    write_dataset(tmp_path, 3, seed=1)
    text = (tmp_path / INDEX).read_text()
    (tmp_path / INDEX).write_text(text[: text.rindex("{") + 10])  # the last record cut mid-line, no newline
    assert [r["id"] for r in read_index(tmp_path)] == [0, 1]
    assert write_dataset(tmp_path, 3, seed=1) == 1
    assert (tmp_path / INDEX).read_text() == text


def test_a_record_whose_clip_is_missing_is_written_again(tmp_path):
    write_dataset(tmp_path, 3, seed=1)
    before = read_frames(tmp_path, read_index(tmp_path)[1])
    (tmp_path / "clips" / "000001.npz").unlink()
    with pytest.raises(DatasetError, match="000001.npz, which is missing"):
        read_frames(tmp_path, read_index(tmp_path)[1])
    assert write_dataset(tmp_path, 3, seed=1) == 1
    records = read_index(tmp_path)
    assert sorted(r["id"] for r in records) == [0, 1, 2]
    assert np.array_equal(read_frames(tmp_path, next(r for r in records if r["id"] == 1)), before)


def test_a_second_writer_is_refused_in_one_line(tmp_path):
    with ClipWriter(tmp_path):
        with pytest.raises(DatasetError, match=f"being written by another process \\(pid {os.getpid()}\\)"):
            ClipWriter(tmp_path).__enter__()
    with ClipWriter(tmp_path) as writer:  # released on exit
        assert writer.done == set()


def test_a_second_writer_process_is_refused_and_loses_nothing(tmp_path):
    code = (
        "import sys, time; from cvg_research.compshapes.dataset import ClipWriter\n"
        "with ClipWriter(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(
            [sys.executable, "-m", "cvg", "compshapes-dataset", "--out", str(tmp_path), "--count", "2"],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and proc.stderr.strip().startswith("cvg: error: ")
        assert len(proc.stderr.strip().splitlines()) == 1 and "being written by another process" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert write_dataset(tmp_path, 2) == 2  # a killed holder's lock is gone with it


def test_a_resume_with_other_settings_is_refused(tmp_path):
    write_dataset(tmp_path, 2, seed=1)
    with pytest.raises(DatasetError, match=r"seed=1 \(asked 2\).*resume with the same settings"):
        write_dataset(tmp_path, 4, seed=2)
    with pytest.raises(DatasetError, match=r"height=64 \(asked 32\)"):
        write_dataset(tmp_path, 4, seed=1, height=32, width=32)
    assert write_dataset(tmp_path, 4, seed=1) == 2  # the same settings resume


def _kill_after(argv: list[str], out, records: int, extra: float) -> int:
    """Run `argv`, SIGKILL it `extra` seconds after `out` holds `records` records; the records it left."""
    kill_when(argv, lambda: len(read_index(out)) >= records, extra, timeout=120)
    return len(read_index(out))


def test_killed_dataset_writes_resume_with_every_record_once(tmp_path):
    """Killed mid-job at drawn moments (a clip file or an index line may be cut short), then run to the end:
    the same set as one uninterrupted write, every record once. A record takes ~5 ms here: 64 of them
    leave every kill (at most 50 ms after its count) ten times the time it needs to land mid-job."""
    COUNT = 64
    write_dataset(tmp_path / "whole", COUNT, seed=3, frames=9, height=32, width=32)
    argv = [
        sys.executable,
        "-m",
        "cvg",
        "compshapes-dataset",
        "--out",
        str(tmp_path / "killed"),
        "--count",
        str(COUNT),
        "--seed",
        "3",
        "--frames",
        "9",
        "--size",
        "32",
    ]
    rng = np.random.default_rng(0)
    left = [_kill_after(argv, tmp_path / "killed", n, float(rng.uniform(0, 0.05))) for n in (2, 6, 10)]
    assert all(0 < n < COUNT for n in left)  # each kill came mid-job
    assert subprocess.run(argv, capture_output=True).returncode == 0
    whole, killed = read_index(tmp_path / "whole"), read_index(tmp_path / "killed")
    assert sorted(r["id"] for r in killed) == list(range(COUNT))
    by_id = {r["id"]: r for r in killed}
    for record in whole:
        assert by_id[record["id"]] == record
        assert np.array_equal(read_frames(tmp_path / "killed", record), read_frames(tmp_path / "whole", record))
    assert not [p for p in (tmp_path / "killed" / "clips").iterdir() if p.name.startswith(".")]  # killed temps


def test_killed_sample_resumes_with_every_record_once(tiny_model_dir, tmp_path):
    # A clip takes ~0.12 s here: after the kill at 3 records (0.2 s late) 9 more take 5x that time.
    RECORDS = 12
    specs = tmp_path / "specs"
    write_dataset(specs, RECORDS, seed=2, frames=5, height=32, width=32)
    argv = [
        sys.executable,
        "-m",
        "cvg",
        "sample",
        "--model",
        str(tiny_model_dir),
        "--specs",
        str(specs),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--guide-steps",
        "1",
        "--pool",
        "1",
        "--max-sequence-length",
        "32",
    ]
    left = [_kill_after(argv, tmp_path / "out", n, 0.2) for n in (1, 3)]
    assert all(0 < n < RECORDS for n in left)
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = read_index(tmp_path / "out")
    assert sorted(r["id"] for r in records) == list(range(RECORDS))
    assert all(read_frames(tmp_path / "out", r).shape == (5, 32, 32, 3) for r in records)
    again = subprocess.run([*argv, "--seed", "1"], capture_output=True, text=True)
    assert again.returncode == 2 and "resume with the same settings" in again.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["clips"] == RECORDS


def test_eval_reads_no_file_outside_the_dataset(tmp_path):
    from cvg_research.compshapes.evaluate import evaluate

    write_dataset(tmp_path / "set", 2, seed=1)
    write_dataset(tmp_path / "other", 1, seed=2)
    records = read_index(tmp_path / "set")
    records[1]["file"] = "../other/clips/000000.npz"
    (tmp_path / "set" / INDEX).write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="lies outside"):
        evaluate(tmp_path / "set", quality=False)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"id": 0, "file": "a.npz"}, {"id": 0, "file": "b.npz"}], "index.jsonl:2: id 0 is listed twice"),
        ([{"id": 1.5}], "index.jsonl:1: id must be a JSON integer, got '1.5'"),
        ([{"id": True}], "index.jsonl:1: id must be a JSON integer"),
        ([{"id": 0, "scene": 7}], "index.jsonl:1: scene must be a JSON object, got '7'"),
        ([{"id": 0, "prompt": ["a", "b"]}], "index.jsonl:1: prompt must be a JSON string"),
    ],
)
def test_records_of_the_wrong_form_are_named_by_line(tmp_path, lines, message):
    (tmp_path / INDEX).write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DatasetError, match=message):
        read_index(tmp_path)


def test_a_record_missing_what_its_use_needs_is_one_line(tiny_model_dir, tmp_path, capsys):
    from cvg.cli import main

    (tmp_path / INDEX).write_text(json.dumps({"id": 4, "composition": {"kind": "presence", "subject": "cube"}}) + "\n")
    assert main(["eval", "--videos", str(tmp_path), "--no-quality"]) == 2
    assert f"{tmp_path / INDEX}: record 4 has no file" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="record 4 has no file"):
        read_frames(tmp_path, read_index(tmp_path)[0])
    args = ["sample", "--model", str(tiny_model_dir), "--specs", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main([*args, "--steps", "1"]) == 2
    assert "record 4 has no prompt" in capsys.readouterr().err
