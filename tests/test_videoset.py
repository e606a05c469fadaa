"""`cvg sample`: a generated video set in the dataset format, resumable, seeds shared across runs."""

import json

import numpy as np

from cvg.cli import main
from cvg.compshapes.dataset import read_frames, read_index, write_dataset
from cvg.compshapes.evaluate import evaluate
from cvg.pipeline import CVGPipeline
from cvg.videoset import generate_set

FAST = {"num_inference_steps": 2, "max_sequence_length": 32}


def test_generated_set_is_judged_and_resumes(tiny_pipe, tmp_path):
    specs = tmp_path / "specs"
    write_dataset(specs, 3, seed=5)
    pipe = CVGPipeline(tiny_pipe)
    first = generate_set(pipe, specs, tmp_path / "gen", seed=11, limit=2, guide_steps=0, **FAST)
    assert first["generated"] == 2 and first["seconds_per_clip"] > 0
    again = generate_set(pipe, specs, tmp_path / "gen", seed=11, guide_steps=0, **FAST)
    assert again["generated"] == 1  # the two clips already there are kept
    records = read_index(tmp_path / "gen")
    assert [r["id"] for r in records] == [0, 1, 2]
    assert [r["prompt"] for r in records] == [r["prompt"] for r in read_index(specs)]
    frames = read_frames(tmp_path / "gen", records[0])
    assert frames.dtype == np.uint8 and frames.shape == (17, 64, 64, 3)
    # Record i uses seed SEED + i: a fresh run reproduces a clip exactly.
    fresh = generate_set(pipe, specs, tmp_path / "fresh", seed=11, limit=1, guide_steps=0, **FAST)
    assert fresh["generated"] == 1
    assert np.array_equal(read_frames(tmp_path / "fresh", read_index(tmp_path / "fresh")[0]), frames)
    report = evaluate(tmp_path / "gen", quality=False)
    assert sum(entry["clips"] for entry in report["categories"].values()) == 3


def test_sample_command(tiny_model_dir, tmp_path, capsys):
    specs = tmp_path / "specs"
    write_dataset(specs, 2, seed=1, categories=("object",))
    code = main(["sample", "--model", str(tiny_model_dir), "--specs", str(specs), "--out", str(tmp_path / "gen"),
                 "--steps", "2", "--guide-steps", "1", "--pool", "1", "--max-sequence-length", "32"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["generated"] == 2 and len(read_index(tmp_path / "gen")) == 2
