"""The Python side of cvg's C++ API (`csrc/engine.cpp`): plain values in, plain values out.

The C++ `cvg::Engine` holds the object `open_engine` returns and calls `generate` on it from any thread;
`cvg.serving.service.Engine` serialises the calls. Frames come back as one C-contiguous uint8 array that the
C++ side copies into its buffer with Python's lock released.
"""

from __future__ import annotations

import numpy as np
import torch

from cvg.guidance.config import GuidanceConfig
from cvg.io.video import to_uint8
from cvg.models import PRECISIONS
from cvg.serving.service import Engine


def open_engine(model: str, options: dict) -> Engine:
    """`options`: height, width, frames (0 = the model's size), steps, guide_steps, guidance_scale,
    backend ("" = diffusers eager), cache_dir ("" = default), classifier ("" = training-free objectives),
    dtype (the transformer's precision: float32, bfloat16 or float16), vae_dtype (the VAE's, the same choices)."""
    dtypes = {name: options.get(name, "float32") for name in ("dtype", "vae_dtype")}
    for name, dtype in dtypes.items():
        if dtype not in PRECISIONS:
            raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {dtype!r}")
    return Engine(
        model,
        options["height"] or None,
        options["width"] or None,
        options["frames"] or None,
        num_inference_steps=options["steps"],
        guidance_scale=options["guidance_scale"],
        guidance=GuidanceConfig(guide_steps=options["guide_steps"]),
        classifier=options["classifier"] or None,
        backend=options["backend"] or None,
        cache_dir=options["cache_dir"] or None,
        transformer_dtype=getattr(torch, dtypes["dtype"]),
        vae_dtype=getattr(torch, dtypes["vae_dtype"]),
    )


def video_shape(engine: Engine) -> tuple[int, int, int]:
    return engine.config.num_frames, engine.config.height, engine.config.width


def generate(engine: Engine, prompt: str, composition: str, seed: int) -> tuple[np.ndarray, list[float]]:
    """uint8 frames `[F, H, W, 3]` and the objective before each guided update ("" = no composition)."""
    out = engine.generate(prompt, composition or None, seed)
    frames = np.ascontiguousarray(to_uint8(out.frames[0]))
    return frames, [float(v[0]) for v in out.objective_values]
