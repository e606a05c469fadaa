"""Two cvg processes on one machine: per-clip time alone and side by side, with cvg's threading policy
(`cvg.threads`: passive OpenMP waiting, threads sized to the cores), with idle workers spinning for
GOMP_SPINCOUNT turns before they sleep (libgomp's default when OMP_WAIT_POLICY is unset is 300k, "about
3 ms"), and with libgomp's active waiting.

    python benchmarks/shared_cores.py --write benchmarks/RESULTS.md

Each process loads the shipped CompShapes generator and times `--clips` unguided 64x64x17 clips at 20
steps after one warm-up clip; "side by side" starts two such processes at once. Same run, same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from cvg.measure import machine_line, publish

MODEL = Path(__file__).resolve().parent.parent / "models" / "compshapes-wan"
CHILD = """
import json, sys, time
import cvg.threads
cvg.threads.configure()
import torch
from cvg.pipeline import CVGPipeline
pipe = CVGPipeline.from_pretrained(sys.argv[1])
pipe.pipe.set_progress_bar_config(disable=True)
seconds = []
for seed in range(int(sys.argv[2]) + 1):
    start = time.perf_counter()
    pipe("a red cube to the left of a blue ball", height=64, width=64, num_frames=17, num_inference_steps=20,
         generator=torch.Generator().manual_seed(seed))
    seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": seconds[1:], "threads": torch.get_num_threads()}))
"""
POLICIES = {
    "cvg (passive, sized)": {},
    "spin 300": {"GOMP_SPINCOUNT": "300"},
    "spin 3k": {"GOMP_SPINCOUNT": "3000"},
    "spin 30k": {"GOMP_SPINCOUNT": "30000"},
    "spin 300k (libgomp's default)": {"GOMP_SPINCOUNT": "300000"},
    "active waiting": {"OMP_WAIT_POLICY": "ACTIVE"},
}


def run(processes: int, clips: int, env: dict[str, str]) -> list[dict]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "CVG_NUM_THREADS")
    }
    argv = [sys.executable, "-c", CHILD, str(MODEL), str(clips)]
    children = [
        subprocess.Popen(argv, env={**base, **env}, stdout=subprocess.PIPE, text=True) for _ in range(processes)
    ]
    results = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"a timing process failed (exit {child.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4, help="timed clips per process (default 4)")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    args = parser.parse_args()
    lines = [
        f"Two cvg processes, {machine_line()}; per-clip medians over {args.clips} clips each",
        "",
        "| policy | threads each | alone (s/clip) | side by side (s/clip, each) | slowdown | throughput "
        "side by side / one after the other |",
        "|---|---|---|---|---|---|",
    ]
    for name, env in POLICIES.items():
        alone = run(1, args.clips, env)[0]
        pair = run(2, args.clips, env)
        t_alone = statistics.median(alone["seconds"])
        t_pair = statistics.median(s for r in pair for s in r["seconds"])
        lines.append(
            f"| {name} | {alone['threads']} | {t_alone:.2f} | {t_pair:.2f} | {t_pair / t_alone:.2f}x | "
            f"{2 * t_alone / t_pair:.2f} |"
        )
    publish("Command: `python benchmarks/shared_cores.py`\n\n" + "\n".join(lines), args.write, "shared_cores")


if __name__ == "__main__":
    main()
