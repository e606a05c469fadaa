"""Ahead-of-time compilation of every Triton kernel for sm_90 and sm_80, on this GPU-less machine."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_default_configs_compile_without_spills(tmp_path):
    report = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "cvg.kernels.check", "--head-dims", "64", "128", "--json", str(report)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(report.read_text())
    kernels = {"fwd", "bwd_delta", "bwd_dkdv", "bwd_dq"}
    dtypes = ("float16", "bfloat16", "float32")
    expected = {(k, a, d, t) for k in kernels for a in (90, 80) for d in (64, 128) for t in dtypes}
    assert {(r["kernel"], r["arch"], r["head_dim"], r["dtype"]) for r in rows} == expected
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= (227 if r["arch"] == 90 else 163) * 1024, r  # opt-in shared memory per block
    # Hopper code uses warpgroup MMA for the half-precision attention dots; Ampere has none.
    assert all(r["hgmma"] for r in rows if r["arch"] == 90 and r["dtype"] != "float32")
    assert not any(r["hgmma"] for r in rows if r["arch"] == 80)
