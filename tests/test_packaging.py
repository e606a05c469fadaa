"""The two packages of this repository: the library wheel (`cvg`) carries no research harness, and the
research wheel (`cvg-research`) carries it with its entry points; both built from copies of the sources."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")


def _wheel(source: Path, out: Path) -> zipfile.ZipFile:
    env = {**os.environ, "CVG_NO_NATIVE": "1"}  # a pure-Python wheel: the layout is what is tested
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", out, source]
    subprocess.run(command, check=True, env=env, capture_output=True, cwd=source)
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("cvg", "kernels", "research"):
        shutil.copytree(ROOT / name, src / name, ignore=SKIP)
    library = _wheel(src, tmp_path_factory.mktemp("library"))
    research = _wheel(src / "research", tmp_path_factory.mktemp("research"))
    return library.namelist(), research.namelist(), research


def test_the_library_wheel_holds_every_cvg_package_and_no_research(wheels):
    library, _, _ = wheels
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "cvg").rglob("__init__.py")}
    assert packages <= {str(Path(n).parent) for n in library}  # none left out (cvg.pipeline once was)
    assert "cvg/kernels/__init__.py" in library
    assert not [n for n in library if "research" in n or "compshapes" in n or "/training/" in n]


def test_the_research_wheel_holds_the_harness_and_registers_its_commands_and_judge(wheels):
    _, research, wheel = wheels
    assert not [n for n in research if n.startswith("cvg/")]
    assert "cvg_research/compshapes/judge.py" in research and "cvg_research/training/generator.py" in research
    assert any(n.startswith("cvg_research/compshapes/assets/encoder/") for n in research)
    (entry_points,) = [n for n in research if n.endswith("entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "[cvg.commands]" in text and "cvg_research.cli:add_parsers" in text
    assert "[cvg.judges]" in text and "compshapes = cvg_research.compshapes.judge:judge" in text
