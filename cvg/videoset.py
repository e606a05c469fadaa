"""Generating a video set: one clip per record of a spec set (a dataset index), in the same format.

The output is what `cvg eval` reads (index.jsonl + clips/*.npz), so generated sets are judged like renders.
Each record's clip uses seed `seed + record id`, so rows of an experiment share their initial noise.
Resumable: clips already in the output index are not generated again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cvg.composition import Composition
from cvg.compshapes.dataset import INDEX, read_index
from cvg.files import atomic_path, write_text_atomic
from cvg.pipeline import CVGPipeline
from cvg.video import to_uint8


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
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_index(out)}
    write_text_atomic(out / INDEX, "".join(json.dumps(r) + "\n" for r in read_index(out)))  # drops a torn line
    seconds = []
    with open(out / INDEX, "a") as index:
        for position, record in enumerate(records):
            key = record.get("id", position)
            if key in done:
                continue
            scene = record.get("scene", {})
            size = {"height": scene.get("height", 480), "width": scene.get("width", 832),
                    "num_frames": scene.get("frames", 81)}  # fmt: skip
            start = time.perf_counter()
            composition = Composition.from_dict(record["composition"]) if "composition" in record else None
            result = pipe(record["prompt"], composition, **{**size, **call},
                          generator=torch.Generator().manual_seed(seed + int(key)))  # fmt: skip
            seconds.append(time.perf_counter() - start)
            name = f"clips/{int(key):06d}.npz"
            with atomic_path(out / name) as tmp:
                np.savez_compressed(tmp, frames=to_uint8(result.frames[0]))
            index.write(json.dumps({**record, "id": key, "file": name}) + "\n")
            index.flush()
            if report is not None:
                report(f"{position + 1}/{len(records)} {record['prompt']!r} {seconds[-1]:.2f} s")
    return {"generated": len(seconds), "clips": len(records),
            "seconds_per_clip": float(np.median(seconds)) if seconds else None}  # fmt: skip
