"""benchmarks/gpu_check.py on the CPU: the dry run CI keeps green, and a run with no GPU that reports every
GPU check as skipped with its reason instead of crashing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_dry_run_names_what_an_empty_bundle_lacks(tmp_path):
    proc = _run("--dry-run", "--bundle", str(tmp_path))
    assert proc.returncode == 1
    assert "no cvg wheel" in proc.stderr and "no diffusers wheel" in proc.stderr and "--prepare" in proc.stderr
    assert "CUDA tests collected: " in proc.stdout and "collected: 0" not in proc.stdout


def test_prepared_bundle_passes_the_dry_run_under_the_carry_limit(tmp_path):
    proc = _run("--prepare", "--bundle", str(tmp_path))
    if proc.returncode and "diffusers" in proc.stderr and "download" in proc.stderr.lower():
        pytest.skip(f"PyPI unreachable for the diffusers wheel: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    wheels = sorted(p.name for p in (tmp_path / "wheels").glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["cvg", "diffusers"] and wheels[0].endswith("py3-none-any.whl")
    assert not (tmp_path / "minilm" / "model.safetensors").exists()  # the tokenizer travels, never the weights
    sizes = [line for line in proc.stdout.splitlines() if line.startswith("bundle: ")]
    assert len(sizes) == 8 and all(line.endswith(" MiB") for line in sizes)


def test_without_a_gpu_every_gpu_check_is_skipped_with_its_reason(tmp_path):
    proc = _run("--out", str(tmp_path), "--budget", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: entry["status"] for name, entry in report["checks"].items()}
    assert statuses == {
        "environment": "passed",
        "cuda tests": "skipped",
        "attention_pool timing": "skipped",
        "real-width steps": "skipped",
        "tiny generation": "skipped",
    }
    assert all(e["reason"] == "no CUDA device" for e in report["checks"].values() if e["status"] == "skipped")
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| cuda tests | skipped |" in table and "no CUDA device" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
