"""The front door: every bad number, path, composition and corrupt artefact is one line on stderr and exit 2,
before any work where it can be known before; never a traceback, never a wrong answer."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cvg.cli import main

SMALL = [
    "--height",
    "64",
    "--width",
    "64",
    "--frames",
    "9",
    "--steps",
    "2",
    "--pool",
    "1",
    "--quiet",
    "--max-sequence-length",
    "32",
]
PROMPT, COMPOSITION = "a red cube to the left of a blue ball", "red cube left of blue ball"


def _generate(model, out, *extra: str, prompt: str = PROMPT, composition: str = COMPOSITION) -> list[str]:
    return [
        "generate",
        "--model",
        str(model),
        "--prompt",
        prompt,
        "--composition",
        composition,
        "--out",
        str(out),
        *SMALL,
        *extra,
    ]


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI in this process; it must exit 2 with one `cvg: error:` line. Returns that line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code} for {argv}: {err}"
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # besides loading progress bars
    assert len(errors) == 1 and err.splitlines()[-1].startswith("cvg: error: "), err
    assert "Traceback" not in err
    return err.splitlines()[-1]


NUMBERS = [
    (["--height", "0"], "argument --height: must be at least 1, got 0"),
    (["--height", "-64"], "must be at least 1"),
    (["--height", "50"], "height must be a positive multiple of 16, got 50 (48 or 64 would do)"),
    (["--frames", "0"], "argument --num-frames/--frames: must be at least 1"),
    (["--frames", "2"], "num_frames must be 4k+1"),
    (["--frames", "10"], "num_frames must be 4k+1 (1, 5, 9, ...), got 10 (9 or 13 would do)"),
    (["--steps", "0"], "argument --num-inference-steps/--steps: must be between 1 and 1000, got 0"),
    (["--steps", "0", "--guide-steps", "0"], "argument --num-inference-steps/--steps: must be between 1 and 1000"),
    (["--steps", "1000000000"], "must be between 1 and 1000"),
    (["--guide-steps", "-1"], "argument --guide-steps: must be at least 0"),
    (["--guide-steps", "9"], "guide_steps must be between 0 and num_inference_steps (2)"),
    (["--guidance-scale", "nan"], "argument --guidance-scale: must be finite, got nan"),
    (["--guidance-scale", "inf"], "must be finite"),
    (["--strength", "-0.1"], "argument --guidance-strength/--strength: must be at least 0"),
    (["--strength", "1e400"], "must be finite"),
    (["--iterations", "0"], "argument --iterations: must be between 1 and 100"),
    (["--height", "1040", "--width", "16"], "height 1040 is 65 tokens along its axis; this model's rotary embedding"),
    (["--frames", "257"], "(rope_max_seq_len): num_frames at most 125"),
    (["--target-loss", "nan"], "argument --target-loss: must be finite"),
    (["--max-sequence-length", "0"], "argument --max-sequence-length: must be between 1 and 512"),
    (["--max-sequence-length", "100000"], "must be between 1 and 512"),
    (["--fps", "0"], "argument --fps: must be between 1 and 240"),
    (["--seed", "-1"], "argument --seed: must be between 0"),
    (["--seed", str(2**70)], "argument --seed: must be between 0"),
    (["--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    (["--pool", "0"], "argument --pool: every value must be at least 1"),
    (["--pool", "1,2"], "expected 1 or 3 comma-separated integers"),
    (["--pool", "100,100,100"], "pool (100, 100, 100) is wider than the token grid (3, 4, 4) along frames"),
    (["--pool", ","], "expected 1 or 3 comma-separated integers"),
    (["--layers", "99"], "layer"),
    (["--compare-seeds", "-1"], "argument --compare-seeds: must be between 0 and 1000"),
    (["--normalize", "median"], "argument --normalize: invalid choice"),
]


@pytest.mark.parametrize("extra, message", NUMBERS, ids=[" ".join(a) for a, _ in NUMBERS])
def test_bad_numbers(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out.mp4"
    assert message in _refused(_generate(tiny_model_dir, out, *extra), capsys)
    assert not out.exists()


COMPOSITIONS = [
    ("red cube left of red cube", "names 'red cube' twice"),
    ("red cube left of green ball", "'green ball' is not in the prompt"),
    ("红色 cube left of blue ball", "'红色 cube' is not in the prompt"),
    ("x" * 10_000, "is not in the prompt"),
    ("", "composition is empty"),
    ("{", "composition JSON is malformed"),
    ('{"kind": "spatial", "subject": 3}', "composition subject must be a string"),
    (",", "one or two entities"),
]


@pytest.mark.parametrize("composition, message", COMPOSITIONS, ids=[c[:30] for c, _ in COMPOSITIONS])
def test_bad_compositions(tiny_model_dir, tmp_path, capsys, composition, message):
    out = tmp_path / "out.gif"
    assert message in _refused(_generate(tiny_model_dir, out, composition=composition), capsys)
    assert not out.exists()


def test_outputs_that_would_lose_files_are_refused_before_generating(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    cases = [
        (tmp_path, "is not empty"),
        (tmp_path / "file", "is a file"),
        (tmp_path / "file" / "out.mp4", "is not a directory"),
        (tmp_path / "out.avi", "unknown video format"),
    ]
    for out, message in cases:
        assert message in _refused(_generate(tiny_model_dir, out), capsys)
    assert "--save-maps" in _refused(
        _generate(tiny_model_dir, tmp_path / "o.mp4", "--save-maps", str(tmp_path / "file" / "m.png")), capsys
    )
    aliases = [
        ("--save-maps", str(tmp_path / "o.mp4"), "--out and --save-maps name the same place"),
        ("--save-maps", str(tmp_path / "frames" / "m.png"), "--out and --save-maps name the same place"),
        ("--contact-sheet", str(tmp_path / "c.png"), "--contact-sheet draws the runs of --compare-seeds"),
    ]
    for flag, path, message in aliases:
        out = tmp_path / ("frames" if "frames" in path else "o.mp4")
        assert message in _refused(_generate(tiny_model_dir, out, flag, path), capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine.txt"]
    assert (tmp_path / "mine.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.sampled_from(
        [
            "--height",
            "--frames",
            "--steps",
            "--guidance-scale",
            "--strength",
            "--seed",
            "--fps",
            "--max-sequence-length",
            "--pool",
            "--iterations",
        ]
    ),
    st.one_of(
        st.integers(-(10**30), 10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(str),
        st.text(max_size=20),
        st.just("x" * 10_000),
    ),
)
def test_any_flag_value_is_taken_or_refused_in_one_line_before_loading(flag, value):
    """Parsing alone (no model): a value is either accepted by the parser or refused in one line."""
    import contextlib
    import io

    from cvg.cli import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--out", "o.mp4", flag, value])
        except SystemExit as e:
            assert e.code == 2
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("cvg: error: ")


def _model_copy(source, target):
    """A copy of a saved pipeline whose large, unchanging text encoder is linked, not copied."""
    target.mkdir()
    for child in source.iterdir():
        if child.name in ("text_encoder", "tokenizer"):
            (target / child.name).symlink_to(child)
        elif child.is_dir():
            shutil.copytree(child, target / child.name)
        else:
            shutil.copy(child, target / child.name)
    return target


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


GENERATOR_DAMAGE = {
    "truncated transformer weights": (
        lambda m: _truncate(m / "transformer" / "diffusion_pytorch_model.safetensors"),
        "cannot load the Wan pipeline",
    ),
    "random-byte VAE weights": (
        lambda m: _random_bytes(m / "vae" / "diffusion_pytorch_model.safetensors"),
        "cannot load the Wan pipeline",
    ),
    "model_index.json not JSON": (lambda m: (m / "model_index.json").write_text("{oops"), "is not JSON"),
    "model_index.json a list": (
        lambda m: (m / "model_index.json").write_text("[1, 2]"),
        "must hold a JSON object, not a list",
    ),
    "model_index.json misses the class": (
        lambda m: (m / "model_index.json").write_text("{}"),
        "names no pipeline class (_class_name); cvg guides WanPipeline, CogVideoXPipeline",
    ),
    "transformer config not JSON": (
        lambda m: (m / "transformer" / "config.json").write_text("nope"),
        "cannot load the Wan pipeline",
    ),
    "transformer config misses fields": (
        lambda m: (m / "transformer" / "config.json").write_text(
            json.dumps({"_class_name": "WanTransformer3DModel", "num_layers": 1})
        ),
        "cannot load the Wan pipeline",
    ),
}


@pytest.mark.parametrize("damage", list(GENERATOR_DAMAGE))
def test_a_damaged_generator_is_one_line(tiny_model_dir, tmp_path, capsys, damage):
    model = _model_copy(tiny_model_dir, tmp_path / "model")
    harm, message = GENERATOR_DAMAGE[damage]
    harm(model)
    assert message in _refused(_generate(model, tmp_path / "out.mp4"), capsys)


CLASSIFIER_DAMAGE = {
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "cannot load"),
    "random-byte weights": (lambda c: _random_bytes(c / "model.safetensors"), "cannot load"),
    "config not JSON": (lambda c: (c / "config.json").write_text("{"), "is not JSON"),
    "config misses fields": (lambda c: (c / "config.json").write_text("{}"), "config.json"),
    "config with unknown fields": (
        lambda c: (c / "config.json").write_text(json.dumps({"colour": 1})),
        "unknown fields colour",
    ),
    "weights missing": (lambda c: (c / "model.safetensors").unlink(), "no classifier in"),
}


@pytest.mark.parametrize("damage", list(CLASSIFIER_DAMAGE))
def test_a_damaged_classifier_is_one_line(tmp_path, capsys, damage):
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "models"
    classifier = tmp_path / "classifier"
    shutil.copytree(shipped / "compshapes-classifier", classifier)
    harm, message = CLASSIFIER_DAMAGE[damage]
    harm(classifier)
    argv = _generate(
        shipped / "compshapes-wan", tmp_path / "out.mp4", "--classifier", str(classifier), "--pool", "1,2,2"
    )  # the pooling the shipped head was trained on
    assert message in _refused(argv, capsys)


def test_a_classifier_for_another_generator_is_refused(tiny_model_dir, tmp_path, capsys):
    from pathlib import Path

    classifier = Path(__file__).resolve().parent.parent / "models" / "compshapes-classifier"
    argv = _generate(tiny_model_dir, tmp_path / "out.mp4", "--classifier", str(classifier))
    assert "was trained for another generator" in _refused(argv, capsys)


def test_a_traceback_never_reaches_the_user_from_a_subprocess(tmp_path):
    """The installed entry point too: a corrupt model index, one line."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("[]")
    proc = subprocess.run(
        [sys.executable, "-m", "cvg", *_generate(tmp_path / "m", tmp_path / "o.mp4")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"cvg: error: {tmp_path / 'm' / 'model_index.json'} must hold a JSON object, not a list"
    ]


def test_latents_of_another_shape_are_named_before_any_work(tiny_pipe):
    import torch

    from cvg.pipeline import CVGPipeline

    pipe = CVGPipeline(tiny_pipe)
    size = {"height": 64, "width": 64, "num_frames": 9, "num_inference_steps": 2}
    wrong = torch.zeros(1, 3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"latents have shape \[1, 3, 3, 8, 8\]; this request's are \[2, "):
        pipe(["a red cube", "a blue ball"], latents=wrong, **size)
