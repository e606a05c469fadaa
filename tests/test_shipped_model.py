"""The shipped CompShapes generator (models/compshapes-wan): small, loads offline, draws what it is told."""

from pathlib import Path

import numpy as np
import torch

from cvg.compshapes.dataset import split_clip
from cvg.compshapes.judge import judge
from cvg.pipeline import CVGPipeline
from cvg.video import to_uint8

MODEL = Path(__file__).resolve().parents[1] / "models" / "compshapes-wan"


def test_shipped_model_is_small_and_complete():
    files = [p for p in MODEL.rglob("*") if p.is_file() and ".work" not in p.parts]
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    names = {p.relative_to(MODEL).as_posix() for p in files}
    assert {"model_index.json", "generator.json", "loss.png", "transformer/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= names  # fmt: skip


def test_shipped_model_draws_single_objects():
    """Held-out single-object prompts at the shipped sampling settings: most are judged right."""
    pipe = CVGPipeline.from_pretrained(MODEL)
    right = 0
    for i in range(6):
        clip = split_clip(77, i, "object", "heldout")
        out = pipe(clip.prompt, height=64, width=64, num_frames=17, num_inference_steps=20,
                   generator=torch.Generator().manual_seed(i))  # fmt: skip
        frames = to_uint8(out.frames[0])
        assert frames.shape == (17, 64, 64, 3) and np.isfinite(out.frames).all()
        right += judge(frames, clip.composition).ok
    assert right >= 4, f"{right}/6 single objects judged right"
