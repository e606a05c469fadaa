"""`cvg sample`: a generated video set in the dataset format, resumable, seeds shared across runs."""

import json
from dataclasses import replace

import numpy as np
import pytest

from cvg.cli import main
from cvg.pipeline import CVGPipeline
from cvg.request import PipelineOptions
from cvg_research.compshapes.dataset import DatasetError, read_frames, read_index, write_dataset
from cvg_research.compshapes.evaluate import evaluate
from cvg_research.compshapes.videoset import generate_set

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
    code = main(
        [
            "sample",
            "--model",
            str(tiny_model_dir),
            "--specs",
            str(specs),
            "--out",
            str(tmp_path / "gen"),
            "--steps",
            "2",
            "--guide-steps",
            "1",
            "--pool",
            "1",
            "--max-sequence-length",
            "32",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["generated"] == 2 and len(read_index(tmp_path / "gen")) == 2


def test_a_resume_is_refused_when_what_decides_the_clips_changed(tiny_pipe, tmp_path):
    """Guided sets record their guidance; an unguided set does not depend on it, so rows share it."""
    specs = tmp_path / "specs"
    write_dataset(specs, 2, seed=5, frames=5, height=32, width=32)
    pipe = CVGPipeline(tiny_pipe)
    generate_set(pipe, specs, tmp_path / "unguided", seed=1, limit=1, guide_steps=0, **FAST)
    generate_set(pipe, specs, tmp_path / "guided", seed=1, limit=1, guide_steps=1, **FAST)
    pipe.guidance = replace(pipe.guidance, strength=0.3)
    assert generate_set(pipe, specs, tmp_path / "unguided", seed=1, guide_steps=0, **FAST)["generated"] == 1
    for out, call in (("guided", {"guide_steps": 1}), ("unguided", {"guide_steps": 0, "seed": 2})):
        with pytest.raises(DatasetError, match="resume with the same settings"):
            generate_set(pipe, specs, tmp_path / out, **{"seed": 1, **call, **FAST})
    assert len(read_index(tmp_path / "guided")) == 1


def test_a_resume_is_refused_when_the_forwards_run_otherwise(tiny_pipe, tmp_path):
    """Batched CFG and step engines change clips within rounding: a set records them and keeps them."""
    specs = tmp_path / "specs"
    write_dataset(specs, 2, seed=5, frames=5, height=32, width=32)
    generate_set(
        CVGPipeline(tiny_pipe, options=PipelineOptions(batch_cfg=True)),
        specs,
        tmp_path / "batched",
        seed=1,
        limit=1,
        guide_steps=0,
        **FAST,
    )
    with pytest.raises(DatasetError, match="resume with the same settings"):
        generate_set(CVGPipeline(tiny_pipe), specs, tmp_path / "batched", seed=1, guide_steps=0, **FAST)
    assert len(read_index(tmp_path / "batched")) == 1
