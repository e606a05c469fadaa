"""The Python side of cvg's C++ API (`csrc/engine.cpp`): plain values in, plain values out.

The C++ `cvg::Engine` holds the object `open_engine` returns and calls `generate` on it from any thread;
`cvg.serving.service.Engine` serialises the calls. Frames come back as one C-contiguous uint8 array that the
C++ side copies into its buffer with Python's lock released.
"""

from __future__ import annotations

import numpy as np

from cvg.guidance.config import GuidanceConfig
from cvg.io.video import to_uint8
from cvg.request import PipelineOptions
from cvg.serving.service import Engine

# The C++ `EngineOptions` fields (csrc/include/cvg/cvg.hpp), by the declared field each sets: a
# `GenerationRequest` setting of every request, a `PipelineOptions` field, or the guidance window.
CPP_SETTINGS = {"height": "height", "width": "width", "frames": "num_frames", "steps": "num_inference_steps"}
CPP_SETTINGS |= {"guidance_scale": "guidance_scale"}
CPP_OPTIONS = {"backend": "step_backend", "cache_dir": "backend_cache", "classifier": "classifier"}
CPP_OPTIONS |= {"dtype": "transformer_dtype", "vae_dtype": "vae_dtype"}
CPP_GUIDANCE = {"guide_steps": "guide_steps"}


def open_engine(model: str, options: dict) -> Engine:
    """`options`: the C++ `EngineOptions` as a dict (`CPP_SETTINGS`, `CPP_OPTIONS`, `CPP_GUIDANCE` name the
    field each sets); a size of 0 or a string "" leaves the field unset (the model's size, diffusers eager, the
    default cache, the training-free objectives)."""
    unset = {name: 0 for name in ("height", "width", "frames")}
    given = {name: value for name, value in options.items() if value != unset.get(name, "")}
    settings = {CPP_SETTINGS[k]: v for k, v in given.items() if k in CPP_SETTINGS}
    pipeline = PipelineOptions(**{CPP_OPTIONS[k]: v for k, v in given.items() if k in CPP_OPTIONS})
    guidance = GuidanceConfig(**{CPP_GUIDANCE[k]: options[k] for k in CPP_GUIDANCE if k in options})
    return Engine(model, options=pipeline, guidance=guidance, **settings)


def video_shape(engine: Engine) -> tuple[int, int, int]:
    settings = engine.settings()
    return settings.num_frames, settings.height, settings.width


def generate(engine: Engine, prompt: str, composition: str, seed: int) -> tuple[np.ndarray, list[float]]:
    """uint8 frames `[F, H, W, 3]` and the objective before each guided update ("" = no composition)."""
    out = engine.generate(prompt, composition or None, seed)
    frames = np.ascontiguousarray(to_uint8(out.frames[0]))
    return frames, [float(v[0]) for v in out.objective_values]
