"""cvg's threading policy: passive OpenMP waiting, intra-op threads sized to the cores given, a knob."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from cvg.threads import available_cores, pinned_threads, thread_count


def _in_fresh_process(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "CVG_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


CONFIGURED = "import os, cvg.threads; cvg.threads.configure(); import torch; "


def test_import_leaves_the_environment_alone():
    code = "import os; before = dict(os.environ); import cvg; print(dict(os.environ) == before)"
    assert _in_fresh_process(code) == "True"
    # Loading the pipeline changes only what torch and diffusers change themselves (inductor's cache dir).
    code = (
        "import os, torch, diffusers, torch._inductor.config; before = dict(os.environ); import cvg; "
        "cvg.CVGPipeline; print(dict(os.environ) == before)"
    )
    assert _in_fresh_process(code) == "True"


def test_configure_sets_passive_waiting_and_sizes_the_pool():
    code = CONFIGURED + "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"
    policy, count = _in_fresh_process(code).split()
    assert policy == "PASSIVE" and 1 <= int(count) <= available_cores()
    assert _in_fresh_process(code, OMP_WAIT_POLICY="ACTIVE").split()[0] == "ACTIVE"  # a choice is kept


def test_the_command_line_configures_the_process():
    code = (
        "import os, sys, cvg.cli; assert 'OMP_WAIT_POLICY' not in os.environ and 'torch' not in sys.modules; "
        "rc = cvg.cli.main(['eval', '--videos', '/nonexistent']); print(os.environ['OMP_WAIT_POLICY'], rc)"
    )
    assert _in_fresh_process(code).split()[-2:] == ["PASSIVE", "2"]


def test_the_knob_sets_the_thread_count():
    code = CONFIGURED + "print(torch.get_num_threads())"
    assert _in_fresh_process(code, CVG_NUM_THREADS="1") == "1"
    assert _in_fresh_process(code, CVG_NUM_THREADS="3") == "3"


def test_a_bad_knob_is_named(monkeypatch):
    monkeypatch.setenv("CVG_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="CVG_NUM_THREADS must be a positive integer, got 'two'"):
        thread_count()


def test_pinned_threads_hold_in_any_thread_and_are_restored():
    before, seen = torch.get_num_threads(), []

    def work():
        with pinned_threads(1):
            seen.append(torch.get_num_threads())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [1] and torch.get_num_threads() == before
