"""The recipe of the CompShapes generator (`GeneratorRecipe`: everything that decides a trained generator,
saved beside it), which of its fields each stage fixes once started, and the training clips it draws."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cvg_research.compshapes.dataset import split_clip
from cvg_research.compshapes.grammar import ALL_CATEGORIES, sealed


@dataclass(frozen=True)
class GeneratorRecipe:
    """Everything that decides the trained generator, saved beside it."""

    seed: int = 0
    frames: int = 17
    size: int = 64
    # VAE
    vae_base_dim: int = 16
    z_dim: int = 8
    vae_steps: int = 2400
    vae_batch: int = 2
    # Frames per first-stage window (1 + 4k). 17, whole clips, lets later chunks learn the causal cache; 1
    # trains on single frames (the path frame 0 takes), many scenes a step, leaving time to the refinement.
    vae_window: int = 17
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5  # small: a sharp posterior; Wan normalises the latent scale anyway
    object_weight: float = 10.0  # object pixels count this many times a background pixel
    vae_extra_motion: bool = True  # motion every other VAE clip (see VAE_CATEGORIES)
    # Pixels this close to an object (Chebyshev distance) weigh as the object's own. At 0 only the object's
    # pixels weigh `object_weight`, so painting its colour over the background costs a tenth of leaving a
    # hole in it: the VAE learned to dilate, and crosses came back as diamonds (fourth version).
    object_margin: int = 0
    # A VAE checkpoint (a stage file of an earlier run, e.g. training/generator-v4/vae_refine.pt) loaded
    # before the first stage; with `vae_steps` 0 the run goes straight to the refinement from it.
    vae_init: str | None = None
    # A second VAE stage from the first's weights (fresh optimiser, fresh clips): more steps at a lower
    # rate with frame 0 weighted up (the causal VAE gives it a latent frame of its own, drawn worst).
    vae_refine_steps: int = 1500
    vae_refine_lr: float = 5e-4
    vae_refine_batch: int = 2  # whole clips a refinement step
    first_frame_weight: float = 4.0  # frame 0's pixels count this many times another frame's (refine only)
    # transformer
    clips: int = 6000  # training clips encoded to latents
    heads: int = 6
    head_dim: int = 32
    layers: int = 4
    ffn_dim: int = 768
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.995
    text_dropout: float = 0.1
    text_tokens: int = 512  # WanPipeline's default max_sequence_length: the model is trained for it
    text_tokens_fed: int | None = 32  # fewer keys per step, same maths (`cvg.models.padding`); None: all
    target: str = "mean"  # "sample" a latent from the VAE posterior, or take its "mean"
    shift: float = 3.0  # flow shift, in training sigmas and in the shipped scheduler
    # Objects fill a few percent of the latent; their cells (any object pixel in the cell's frames) count
    # this many times a background cell in the flow loss, so capacity goes to drawing them.
    latent_object_weight: float = 5.0
    # Single latent frames a step besides the clips: frame 0's latent, the image the causal VAE encodes it as,
    # from other training clips. A fifth of a clip's tokens each, so many more scenes a step for the drawing
    # of colours and shapes, which every category needs (as video models train on images and clips together).
    image_batch: int = 0
    image_weight: float = 1.0  # the image loss's weight against the clips' (the two are averaged with it)
    # Transformer forward under bfloat16 autocast (weights, loss and optimiser stay float32): only where the
    # CPU has bf16 instructions (without avx512_bf16 or AMX a bf16 matmul runs ~100x slower than float32).
    bf16: bool = False
    checkpoint_every: int = 100

    def __post_init__(self):
        if not 1 <= self.vae_window <= self.frames or (self.vae_window - 1) % 4:
            raise ValueError(f"vae_window must be 1 + 4k frames, at most frames ({self.frames}); got {self.vae_window}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneratorRecipe:
        """A recipe saved as JSON (a run's `.work/recipe.json`, or one kept under training/)."""
        try:
            fields = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"recipe {path}: {e}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"recipe {path}: expected a JSON object of GeneratorRecipe fields")
        if unknown := sorted(set(fields) - set(cls.__dataclass_fields__)):
            raise ValueError(f"recipe {path}: unknown fields {', '.join(unknown)}")
        return cls(**fields)


# Which recipe fields each stage's result depends on: a resumed run may change the fields of stages that
# have not started (the transformer's while the VAE trains), never those of a stage with a checkpoint.
_VAE_FIELDS = ("seed", "frames", "size", "vae_base_dim", "z_dim", "vae_steps", "vae_batch", "vae_window", "vae_lr")
_VAE_LOSS_FIELDS = ("kl_weight", "object_weight", "object_margin", "vae_extra_motion", "vae_init")
STAGE_FIELDS = {
    "vae.pt": (*_VAE_FIELDS, *_VAE_LOSS_FIELDS),
    "vae_refine.pt": (*_VAE_LOSS_FIELDS, "vae_refine_steps", "vae_refine_lr", "vae_refine_batch", "first_frame_weight"),
    "latents": ("clips", "object_margin"),
}


def seeded(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


def training_clips(recipe: GeneratorRecipe, stage: int, first: int, count: int, categories=ALL_CATEGORIES):
    """Clips `first..first+count-1` of a stage's stream, categories in turn, training prompts only."""
    size = {"frames": recipe.frames, "height": recipe.size, "width": recipe.size}
    return list(
        sealed(
            split_clip(recipe.seed * 1000 + stage, i, categories[i % len(categories)], "train", **size)
            for i in range(first, first + count)
        )
    )


def check_resumable(work: Path, recipe: GeneratorRecipe) -> None:
    """Refuse to resume a run whose finished or started stages had other recipe fields (named)."""
    path = work / "recipe.json"
    if not path.is_file():
        return
    stored, asked = asdict(GeneratorRecipe.from_file(path)), asdict(recipe)  # fields added since: their defaults
    changed = {k for k in {*stored, *asked} if stored.get(k) != asked.get(k)}
    started = [stage for stage in (*STAGE_FIELDS, "transformer.pt") if (work / stage).exists()]
    fixed = set().union(*(STAGE_FIELDS.get(s, asked) for s in started)) if started else set()
    if "latents" in started or "transformer.pt" in started:
        fixed |= set(STAGE_FIELDS["vae.pt"])  # later stages read the VAE
    if clash := sorted(changed & fixed):
        detail = ", ".join(f"{k}={stored.get(k)!r} (asked {asked.get(k)!r})" for k in clash)
        raise ValueError(f"{work} holds a run started with {detail}; resume with those or train into another directory")
