"""Guidance under diffusers' context parallelism (Ulysses over 2 gloo ranks on this CPU): the maps, the
objective and the latent gradient of a guided step, and a guided generation, equal the single process's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import free_port

RANK_SCRIPT = Path(__file__).with_name("cp_rank.py")


def _run(out: Path, world: int) -> dict:
    port = free_port()
    command = [sys.executable, str(RANK_SCRIPT), "--world", str(world), "--port", str(port), "--out", str(out)]
    ranks = [
        subprocess.Popen([*command, "--rank", str(r)], env=os.environ.copy(), stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    for rank in ranks:
        _, err = rank.communicate(timeout=300)
        assert rank.returncode == 0, err[-2000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    return _run(root / "single.pt", 1), _run(root / "parallel.pt", 2)


@pytest.mark.parametrize("name", ["presence", "spatial", "motion", "classifier"])
def test_a_guided_step_over_two_ranks_is_the_single_process_step(runs, name):
    single, parallel = runs[0][name], runs[1][name]
    assert (single["queries"], parallel["queries"]) == (48, 24)  # each rank pooled half of the 3x4x4 tokens
    assert single["grad"].abs().max() > 0
    for key in ("loss", "maps", "grad"):
        torch.testing.assert_close(parallel[key], single[key], rtol=0, atol=1e-5 * max(1.0, single[key].abs().max()))


def test_a_guided_generation_over_two_ranks_is_the_single_process_one(runs):
    single, parallel = runs[0]["generation"], runs[1]["generation"]
    assert single["objective"].numel() == 2
    torch.testing.assert_close(parallel["objective"], single["objective"], rtol=0, atol=1e-5)
    torch.testing.assert_close(parallel["latents"], single["latents"], rtol=0, atol=1e-5)
