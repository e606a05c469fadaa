"""How cvg shares a machine's cores with other processes (serving replicas, CI beside a build, an
experiment beside a test).

Two torch processes on a 2-core machine each spin their OpenMP workers while waiting for work (libgomp's
default active wait) and steal each other's cores: one CompShapes clip took 2.2 s alone and 15.4 s each
with a second process running. So cvg:

- sets `OMP_WAIT_POLICY=PASSIVE` unless the environment says otherwise: idle workers sleep. libgomp reads
  it once, when it is loaded, so `cvg.threads.configure()` must run before `import torch` for it to take
  effect (`python -m cvg` and `cvg` do); otherwise set it yourself. Sleeping workers wake later: a process
  alone runs about a third slower than with workers that spin a while first (benchmarks/RESULTS.md,
  shared_cores), so a script with the cores to itself may set GOMP_SPINCOUNT=3000 (most of the gain, the
  least harm if another process turns up; ACTIVE was slower alone and 4× slower shared), with all its torch
  work on one thread: libgomp throttles spinning to 100 turns once its teams hold more threads than CPUs,
  and every thread that runs a parallel op keeps a team.
- sizes torch's intra-op pool to the cores this process is given (its CPU affinity and its cgroup's CPU
  quota), never more. `CVG_NUM_THREADS=N` (the knob) sets it outright; `OMP_NUM_THREADS` is respected.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KNOB = "CVG_NUM_THREADS"


def configure() -> None:
    """Apply cvg's policy to this process: the OpenMP settings libgomp reads when it loads, so torch starts
    with `thread_count()` intra-op threads and sleeping workers; if torch is already loaded, its thread
    count is set instead. cvg's entry points call it (the `cvg` command and `cvg serve`, `python -m
    cvg.bench`, the experiments); a program that embeds cvg calls it itself, before it imports torch.
    `import cvg` alone changes nothing in the process's environment."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" not in sys.modules and (os.environ.get(KNOB) or not os.environ.get("OMP_NUM_THREADS")):
        os.environ["OMP_NUM_THREADS"] = str(thread_count())
    # torch caps OMP_NUM_THREADS at the core count when it loads: more threads than cores (the knob's
    # choice) need torch loaded now; so does a torch that was loaded before cvg.
    if "torch" in sys.modules or thread_count() > available_cores():
        apply_thread_count()


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def thread_count() -> int:
    """The intra-op threads cvg runs with: CVG_NUM_THREADS, else OMP_NUM_THREADS, else the available cores."""
    if text := os.environ.get(KNOB, "").strip():
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{KNOB} must be a positive integer, got {text!r}")
        return int(text)
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(omp) if omp.isdigit() and int(omp) > 0 else available_cores()


def apply_thread_count() -> None:
    """With torch loaded: the knob if set, else never more intra-op threads than `thread_count()` (torch counts
    the machine's CPUs, not the container's quota); a smaller count someone chose is kept."""
    import torch

    if os.environ.get(KNOB) or torch.get_num_threads() > thread_count():
        torch.set_num_threads(thread_count())


@contextmanager
def pinned_threads(count: int) -> Iterator[None]:
    """Run a block with exactly `count` intra-op threads, whichever thread calls it: reductions split the
    same way, so a request's result does not depend on the thread or the moment it ran in."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
