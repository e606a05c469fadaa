"""The C++ API (csrc/): built with CMake as a consumer builds it, run on the shipped model, compared with Python.

Needs cmake and a C++ compiler (the project's machines have both); skipped with that reason elsewhere.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvg.request import PipelineOptions
from cvg.serving.service import Engine

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "compshapes-wan"
STEPS = 4
pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("c++") is None, reason="cmake and a C++ compiler are needed"
)


def _cmake(*args: str) -> None:
    subprocess.run(["cmake", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """libcvg installed to a prefix, then the example and the C++ test built against it with find_package."""
    work = tmp_path_factory.mktemp("cpp")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    pybind11_dir = subprocess.run(
        [sys.executable, "-m", "pybind11", "--cmakedir"], check=True, capture_output=True, text=True
    ).stdout.strip()
    start = time.perf_counter()
    _cmake(
        "-S",
        str(ROOT / "csrc"),
        "-B",
        str(work / "cvg"),
        *generator,
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11_dir}",
    )
    _cmake("--build", str(work / "cvg"))
    _cmake("--install", str(work / "cvg"), "--prefix", str(work / "prefix"))
    for name, source in (("example", ROOT / "examples" / "cpp"), ("tests", ROOT / "tests" / "cpp")):
        _cmake("-S", str(source), "-B", str(work / name), *generator, f"-DCMAKE_PREFIX_PATH={work / 'prefix'}")
        _cmake("--build", str(work / name))
    print(f"C++ build: {time.perf_counter() - start:.1f} s")
    return work


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "CVG_PYTHON": sys.executable}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def test_example_writes_the_frames_the_python_api_gives(built, tmp_path):
    prompt, composition, seed = "a red cube to the left of a blue ball", "red cube left of blue ball", 3
    run = _run(
        built / "example" / "generate",
        MODEL,
        prompt,
        tmp_path / "frames",
        "--composition",
        composition,
        "--seed",
        seed,
        "--steps",
        STEPS,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted((tmp_path / "frames").glob("frame_*.ppm"))
    assert len(files) == 17
    from_cpp = np.stack([np.asarray(Image.open(f)) for f in files])
    engine = Engine(MODEL, num_inference_steps=STEPS, options=PipelineOptions())
    expected = engine.generate(prompt, composition, seed)
    assert from_cpp.shape == (17, 64, 64, 3)
    np.testing.assert_array_equal(from_cpp, (np.clip(expected.frames[0], 0, 1) * 255 + 0.5).astype(np.uint8))


def test_example_reports_a_bad_model_in_one_line(built, tmp_path):
    run = _run(built / "example" / "generate", tmp_path / "missing", "a red cube", tmp_path / "frames")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == f"cvg: error: model directory '{tmp_path / 'missing'}' does not exist"
    assert not (tmp_path / "frames").exists()


def test_cpp_engine_from_four_threads_and_after_errors(built):
    run = _run(built / "tests" / "test_engine", MODEL, STEPS)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert "all checks hold" in run.stdout
    assert "thread 3 equals its sequential result" in run.stdout
