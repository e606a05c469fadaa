"""Generating a video set: one clip per record of a spec set (a dataset index), in the same format.

The output is what `cvg eval` reads (index.jsonl + clips/*.npz), so generated sets are judged like renders.
Each record's clip uses seed `seed + record id`, so rows of an experiment share their initial noise.
Resumable: clips already in the output index are not generated again; a resume with other settings
(seed, spec set, call arguments, guidance) is refused (`ClipWriter`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cvg.guidance.composition import Composition
from cvg.io.video import to_uint8
from cvg.pipeline import CVGPipeline
from cvg_research.compshapes.dataset import ClipWriter, read_index, required


def generate_set(
    pipe: CVGPipeline,
    specs: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    limit: int | None = None,
    report=None,
    **call,
) -> dict:
    """Generate the first `limit` records of `specs` into `out`; `call` goes to `CVGPipeline.__call__`
    (height, width and num_frames default to each record's scene). Returns counts and seconds per clip."""
    records = read_index(specs)
    if not records:
        raise FileNotFoundError(f"no records in {specs}")
    records = records[:limit]
    seconds = []
    params = {"specs": str(Path(specs).resolve()), "seed": seed, "call": call}
    if call.get("guide_steps") != 0:  # guided: its settings too (unguided rows share one folder across them)
        params.update(guidance=asdict(pipe.guidance), objective=type(pipe.objective).__name__)
    batch_cfg, backend = pipe.options.batch_cfg, pipe.options.step_backend
    if batch_cfg or backend is not None:  # how the forwards ran changes the clips (within rounding)
        params["execution"] = {"batch_cfg": batch_cfg, "engine": backend}
    with ClipWriter(out, params) as writer:
        for position, record in enumerate(records):
            required(record, specs, "prompt")
            key = int(record.get("id", position))
            if key in writer.done:
                continue
            scene = record.get("scene", {})
            size = {
                "height": scene.get("height", 480),
                "width": scene.get("width", 832),
                "num_frames": scene.get("frames", 81),
            }
            composition = Composition.from_dict(record["composition"]) if "composition" in record else None
            start = time.perf_counter()
            result = pipe(
                record["prompt"], composition, **{**size, **call}, generator=torch.Generator().manual_seed(seed + key)
            )
            seconds.append(time.perf_counter() - start)
            writer.add(key, to_uint8(result.frames[0]), record)
            if report is not None:
                report(f"{position + 1}/{len(records)} {record['prompt']!r} {seconds[-1]:.2f} s")
    return {
        "generated": len(seconds),
        "clips": len(records),
        "seconds_per_clip": float(np.median(seconds)) if seconds else None,
    }
