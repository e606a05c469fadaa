"""Recording results: the machine line every table starts with, marked Markdown sections replaced in
place (benchmarks/RESULTS.md, docs), and measurements taken in a child process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from cvg.hardware import bf16_units, cpu_model
from cvg.io.files import write_text_atomic


def machine_line() -> str:
    """The machine a table was measured on. bf16 speed depends on the CPU's matrix units (AMX tiles run
    bf16 matmuls several times faster than avx512_bf16 alone), so the model and those units are named."""
    cores = f"{os.cpu_count()} cores"
    return f"CPU ({cpu_model()}, {cores}, {bf16_units()}, torch {torch.__version__}, {platform.machine()})"


def publish(text: str, path: Path | None, name: str) -> None:
    """Print a results text and, with `path`, record it as the marked section `name` of that Markdown file."""
    print(text)
    if path is not None:
        write_section(path, name, text)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the marked section `name` of a Markdown file, atomically."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)


def json_child(argv: list[str], env: dict[str, str], what: str) -> dict:
    """Run `python argv...` with extra environment; its last stdout line is JSON. One-line error if it fails."""
    proc = subprocess.run([sys.executable, *argv], env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def clip_size(text: str) -> tuple[int, int, int]:
    """A `HEIGHTxWIDTHxFRAMES` command-line size as (frames, height, width)."""
    height, width, frames = (int(x) for x in text.split("x"))
    return frames, height, width
