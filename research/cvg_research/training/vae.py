"""The CompShapes generator's VAE: a small `AutoencoderKLWan` (4x spatial, 4x temporal compression), trained
from scratch on windows of clips (`vae.pt`; `vae_window` 1: single frames, many scenes a step) and then
refined on whole clips from its weights (`vae_refine.pt`), or refined from an earlier run's checkpoint
(`GeneratorRecipe.vae_init`). The loss is L1 with object pixels, and those near them (`object_margin`),
weighed up, plus a small KL term."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from cvg.models.wan import to_pixels
from cvg_research.compshapes.grammar import ALL_CATEGORIES
from cvg_research.compshapes.world import BACKGROUND, render
from cvg_research.training.loop import Checkpoint, LossLog, cosine_schedule
from cvg_research.training.recipe import GeneratorRecipe, seeded, training_clips


def build_vae(recipe: GeneratorRecipe) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=recipe.vae_base_dim,
        z_dim=recipe.z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * recipe.z_dim,
        latents_std=[1.0] * recipe.z_dim,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )


# With `vae_extra_motion` the VAE sees motion every other clip: four of five categories are static, and a
# causal video VAE trained on them learns to copy the previous frame, so fast-moving objects stay put when
# decoded. (Measured: it fixes motion but, at z_dim 16 and this budget, shifted red to orange; see docs.)
VAE_CATEGORIES = tuple(c for other in ALL_CATEGORIES if other != "motion" for c in ("motion", other))


def train_vae(recipe: GeneratorRecipe, work: Path, report: Callable[[str], None] = print) -> AutoencoderKLWan:
    """The VAE's two stages: from scratch (`vae.pt`), then refined from its weights (`vae_refine.pt`)."""
    torch.manual_seed(recipe.seed)
    vae = build_vae(recipe).train()
    if recipe.vae_init:
        vae.load_state_dict(load_vae_checkpoint(recipe.vae_init))
    first = Stage("vae", recipe.vae_steps, recipe.vae_lr, recipe.vae_batch, recipe.vae_window, 1, 1.0)
    _vae_stage(recipe, vae, work, first, report)
    if recipe.vae_refine_steps:  # from the first stage's final weights, which `vae` now holds
        refine = Stage(
            "vae_refine",
            recipe.vae_refine_steps,
            recipe.vae_refine_lr,
            recipe.vae_refine_batch,
            recipe.frames,
            4,
            recipe.first_frame_weight,
        )
        _vae_stage(recipe, vae, work, refine, report)
    return vae.eval()


def load_vae_checkpoint(path: str | os.PathLike) -> dict:
    """The VAE weights of a stage checkpoint (`vae.pt` or `vae_refine.pt` of a run)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"vae_init {path}: no such file (paths are read from the working directory)")
    saved = torch.load(path, weights_only=True)
    if "vae" not in saved:
        raise ValueError(f"vae_init {path}: not a VAE stage checkpoint (no 'vae' entry)")
    return saved["vae"]


def near_objects(drawn: torch.Tensor, margin: int) -> torch.Tensor:
    """`drawn` (bool [..., H, W]) grown by `margin` pixels in H and W: every pixel that close to an object."""
    if margin == 0:
        return drawn
    shape = drawn.shape
    grown = F.max_pool2d(drawn.reshape(-1, 1, *shape[-2:]).float(), 2 * margin + 1, stride=1, padding=margin)
    return grown.reshape(shape) > 0


@dataclass(frozen=True)
class Stage:
    """One VAE stage: its checkpoint's name, steps, rate, clips a step, frames a window, the seed stream
    its clips and noise are drawn from, and how much frame 0 of a clip weighs."""

    name: str
    steps: int
    lr: float
    batch: int
    window: int
    stream: int
    first_frame: float


def _vae_stage(recipe: GeneratorRecipe, vae: AutoencoderKLWan, work: Path, stage: Stage, report) -> None:
    """Train `vae` for the stage's steps (resumable from WORK/<name>.pt): weighted L1 + KL on windows of
    training clips, each clip's window starting at a frame of its own."""
    opt = torch.optim.AdamW(vae.parameters(), stage.lr, weight_decay=0.0)
    ckpt, log = Checkpoint(work / f"{stage.name}.pt", recipe.checkpoint_every), LossLog(work / "log.jsonl", stage.name)
    start = ckpt.load(vae=vae, opt=opt)
    log.rewind(start)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1, 1) / 127.5 - 1
    categories = VAE_CATEGORIES if recipe.vae_extra_motion else ALL_CATEGORIES
    t0 = time.perf_counter()
    for step in range(start, stage.steps):
        gen = seeded(recipe.seed, stage.stream, step)
        clips = training_clips(recipe, stage.stream, step * stage.batch, stage.batch, categories)
        offsets = torch.randint(0, recipe.frames - stage.window + 1, (stage.batch,), generator=gen).tolist()
        x = to_pixels([render(c.scene, range(o, o + stage.window)) for c, o in zip(clips, offsets, strict=True)])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # Objects are a few percent of the pixels; weigh them up so the background does not win.
        drawn = near_objects((x - background).abs().amax(1, keepdim=True) > 0.05, recipe.object_margin)
        weight = 1 + (recipe.object_weight - 1) * drawn.float()
        starts = torch.tensor([o == 0 for o in offsets])
        weight[starts, :, 0] *= stage.first_frame
        rec = (weight * (recon - x).abs()).mean()
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).mean()
        loss = rec + recipe.kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = stage.lr * cosine_schedule(step, stage.steps, 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log.write(step + 1, loss=rec.item(), kl=kl.item())
        if (step + 1) % 50 == 0:
            seconds = time.perf_counter() - t0
            report(f"{stage.name} step {step + 1}/{stage.steps} recon {rec.item():.4f} ({seconds:.0f} s)")
        ckpt.save(step + 1, done=step + 1 == stage.steps, vae=vae, opt=opt)
