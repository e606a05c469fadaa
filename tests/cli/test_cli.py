"""The `cvg` command line, end to end on a saved tiny model."""

import json
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from cvg.cli import build_parser, generation, main
from cvg.cli.arguments import config_from
from cvg.cli.generation import GUIDANCE_FLAGS
from cvg.guidance.config import GuidanceConfig
from cvg.models.caching import WAN_TAYLORSEER_MODULES

SMALL = [
    "--height",
    "64",
    "--width",
    "64",
    "--frames",
    "9",
    "--steps",
    "4",
    "--pool",
    "1",
    "--quiet",
    "--max-sequence-length",
    "64",
]


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "-m", "cvg", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "generate" in proc.stdout and "make-tiny-model" in proc.stdout
    for name, command in build_parser()._subparsers._group_actions[0].choices.items():
        undocumented = [a.dest for a in command._actions if not a.help]
        assert not undocumented, f"cvg {name}: flags without help: {undocumented}"


def test_the_parser_loads_no_model_stack():
    """`cvg --help` and argument errors answer without torch or diffusers (the commands load them)."""
    code = (
        "import sys, cvg.cli; cvg.cli.build_parser().parse_args(['generate', '--model', 'm', '--prompt', 'p', "
        "'--out', 'o.mp4']); print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("flag, geometric", [([], True), (["--no-geometric"], False), (["--geometric"], True)])
def test_geometric_flag(flag, geometric):
    """The geometric term is on by default (GuidanceConfig) and `--no-geometric` turns it off."""
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--out", "o.mp4", *flag])
    assert config_from(args, GuidanceConfig, GUIDANCE_FLAGS).geometric is geometric


@pytest.mark.parametrize(
    ("flags", "batched", "cache", "engine"),
    [
        ([], False, None, None),
        (["--batch-cfg"], True, None, None),
        (["--first-block-cache", "0.1"], False, ("FirstBlockCacheConfig", "threshold", 0.1), None),
        (["--taylorseer-cache", "3"], False, ("TaylorSeerCacheConfig", "cache_interval", 3), None),
        (["--engine", "compiled", "--batch-cfg"], True, None, "compiled"),
    ],
)
def test_execution_flags_reach_the_pipeline(tiny_model_dir, flags, batched, cache, engine):
    """`--batch-cfg` runs the two forwards of classifier-free guidance as one batch, `--first-block-cache`
    and `--taylorseer-cache` cache the later steps (TaylorSeer on Wan's modules), `--engine` runs them on a
    step engine; all off by default."""
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "p", "--out", "o.mp4", *flags]
    pipe, _ = generation.load_pipeline(build_parser().parse_args(argv))
    assert pipe.options.batch_cfg is batched
    if cache is None:
        assert pipe.cache is None
    else:
        kind, field, value = cache
        assert (type(pipe.cache).__name__, getattr(pipe.cache, field)) == (kind, value)
    if "--taylorseer-cache" in flags:
        assert pipe.cache.cache_identifiers == WAN_TAYLORSEER_MODULES
    assert pipe.options.step_backend == engine


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engine", "torch", "--first-block-cache", "0.1"], "first.block.cache runs on eager diffusers forwards"),
        (["--engine", "torch", "--taylorseer-cache", "2"], "taylorseer.cache runs on eager diffusers forwards"),
        (["--first-block-cache", "0.1", "--taylorseer-cache", "2"], "choose one step cache"),
    ],
)
def test_a_cache_with_an_engine_or_another_cache_is_refused(flags, message):
    argv = ["generate", "--model", "m", "--prompt", "p", "--out", "o.mp4", *flags]
    with pytest.raises(ValueError, match=message):
        generation.load_pipeline(build_parser().parse_args(argv))


def test_generate_mp4_and_maps(tiny_model_dir, tmp_path, capsys):
    out, maps = tmp_path / "out.mp4", tmp_path / "maps.png"
    prompt, composition = "a red cube to the left of a blue ball", "red cube left of blue ball"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            prompt,
            "--composition",
            composition,
            "--out",
            str(out),
            "--save-maps",
            str(maps),
            *SMALL,
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    default = GuidanceConfig()  # a training-free objective never reaches its target: every update is made
    assert report["out"] == str(out) and len(report["objective"]) == default.guide_steps * default.iterations
    assert "verdict" not in report
    frames = imageio.mimread(out)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    picture = Image.open(maps)
    assert picture.width > 3 * 128 and picture.height > 2 * 128  # 3 pooled frames x 2 entities, 128 px cells
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("target", ["clip.gif", "frames"])
def test_generate_gif_and_png_frames(tiny_model_dir, tmp_path, target):
    out = tmp_path / target
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompt",
                "a ball moves right",
                "--composition",
                "ball moves right",
                "--out",
                str(out),
                *SMALL,
                *(["--vae-dtype", "bfloat16"] if target.endswith(".gif") else []),  # the decode in bf16 too
            ]
        )
        == 0
    )
    if target.endswith(".gif"):
        assert Image.open(out).n_frames == 9
    else:
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 9 and np.asarray(Image.open(pngs[0])).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--composition", "red cube left of green ball"], "'green ball' is not in the prompt"),
        (["--guide-steps", "9"], "guide_steps must be between 0 and num_inference_steps (4)"),
    ],
)
def test_bad_input_is_one_line_on_stderr(tiny_model_dir, tmp_path, args, message):
    base = {"--model": str(tiny_model_dir), "--composition": "red cube"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [sys.executable, "-m", "cvg", "generate", "--prompt", "a red cube", "--out", str(tmp_path / "o.mp4"), *SMALL]
    for flag, value in base.items():
        argv += [flag, value]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cvg: error: ") and message in last
    assert not (tmp_path / "o.mp4").exists()


def test_generate_with_the_judges_verdict(tiny_model_dir, tmp_path, capsys):
    """A random tiny model draws no red cube: the verdict says so, with a reason."""
    out = tmp_path / "out.gif"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompt",
                "a red cube to the left of a blue ball",
                "--composition",
                "red cube left of blue ball",
                "--out",
                str(out),
                "--judge",
                *SMALL,
            ]
        )
        == 0
    )
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["verdict"]
    assert verdict["ok"] is False and verdict["reason"] and verdict["failure"] in ("drawing", "composition")


def test_compare_seeds_judges_each_run_and_draws_a_contact_sheet(tiny_model_dir, tmp_path, capsys):
    sheet = tmp_path / "contact.png"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompt",
                "a red cube to the left of a blue ball",
                "--composition",
                "red cube left of blue ball",
                "--out",
                str(tmp_path / "out.gif"),
                "--judge",
                "--compare-seeds",
                "2",
                "--seed",
                "3",
                "--contact-sheet",
                str(sheet),
                *SMALL,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    comparison = json.loads(captured.out.strip().splitlines()[-1])["comparison"]
    assert [(r["seed"], r["run"]) for r in comparison["runs"]] == [
        (3, "unguided"),
        (3, "guided"),
        (4, "unguided"),
        (4, "guided"),
    ]
    assert comparison["counts"] == {"unguided": 0, "guided": 0}  # a random tiny model draws no red cube
    assert "unguided 0 of 2 seeds, guided 0 of 2" in captured.err
    picture = Image.open(sheet)
    assert picture.height == 4 * 2 * 64 and picture.width == 170 + 9 * 2 * 64  # a row per run, 9 frames across


def test_make_tiny_model_writes_a_new_or_empty_directory_and_refuses_anything_else(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert main(["make-tiny-model", str(tmp_path / "model"), "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tmp_path / "model")
    weights = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "model").rglob("*")}
    assert "model_index.json" in weights
    (tmp_path / "notes.txt").write_text("mine")
    for taken in (tmp_path / "model", tmp_path / "notes.txt"):  # a model already there; a file
        assert main(["make-tiny-model", str(taken)]) == 2
        assert "exists and is not an empty directory" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "model").rglob("*")} == weights
    assert (tmp_path / "notes.txt").read_text() == "mine"
