"""Every example in the README runs as written: its Python blocks and its shell commands (`make demo` and
`make test` apart: they are what CI runs, around this suite); and the attention_pool example of
docs/attention_pool.md."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _commands() -> list[str]:
    """The README's shell commands, continuation lines joined and comments dropped."""
    commands = []
    for block in _blocks(README, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_the_readme_holds_the_two_commands_and_is_short():
    assert {"make demo", "make test"} <= set(_commands())
    assert len(README.splitlines()) <= 200


@pytest.mark.parametrize("command", [c for c in _commands() if not c.startswith("make ")])
def test_each_readme_command_runs(command, tmp_path):
    argv = shlex.split(command)
    assert argv[0] == "cvg", f"a README command the test does not know how to run: {command}"
    argv = [
        str(Path(sys.executable).with_name("cvg")),
        *(str(ROOT / a) if a.startswith("models/") else a for a in argv[1:]),
    ]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


OTHER_EXAMPLES = [b for b in _blocks(README, "python") if "CVGPipeline" not in b]  # that one: below


@pytest.mark.parametrize("index", range(len(OTHER_EXAMPLES)))
def test_each_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name the shipped models by their paths in the repository
    monkeypatch.setenv("CVG_CACHE", str(tmp_path))  # a step backend's build stays out of the user's cache
    scope: dict = {}
    exec(compile(OTHER_EXAMPLES[index], "README.md", "exec"), scope)


def test_the_attention_pool_example_runs():
    text = (ROOT / "docs" / "attention_pool.md").read_text()
    blocks = [b for b in _blocks(text, "python") if "attention_pool(" in b]
    assert blocks, "docs/attention_pool.md has no attention_pool example"
    scope: dict = {}
    exec(compile(blocks[0], "attention_pool.md", "exec"), scope)
    assert scope["maps"].shape == (1, 21, 15, 26, 2)
    assert scope["q"].grad is not None and scope["q"].grad.abs().sum() > 0


def test_the_python_examples_show_what_they_claim(tmp_path, monkeypatch):
    """The generation example runs, and its output is guided: one objective value per guided update, maps of
    both entities."""
    (example,) = [b for b in _blocks(README, "python") if "CVGPipeline" in b]
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.frames.shape == (1, 17, 64, 64, 3)
    assert len(out.objective_values) >= 1 and out.maps[0].shape[-1] >= 2
