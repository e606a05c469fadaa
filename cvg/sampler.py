"""The guided sampler: WanPipeline's denoising loop with CVG guidance in the first steps.

For each of the first `guide_steps` steps, `iterations` times: run the transformer on the latent with
recording processors (stopping after the last recorded block, since nothing later reaches the loss),
score the pooled maps with the objective, and move the latent down the normalised gradient. Then the
step continues as in diffusers: a gradient-free prediction (with classifier-free guidance when on) and
the scheduler's step. Later steps are unguided. With no guided step this is WanPipeline's loop, op for op.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cvg.composition import BoundComposition
from cvg.objectives import Objective
from cvg.processors import record_maps, resolve_layers

NORMALIZATIONS = ("rms", "max", "none")


@dataclass
class GuidanceConfig:
    guide_steps: int = 2
    strength: float = 0.1  # size of one latent update (its RMS, with normalize="rms")
    iterations: int = 1
    normalize: str = "rms"  # per-sample gradient normalisation: rms, max or none
    layers: list[int] | None = None  # recorded blocks; None = all
    pool: tuple[int, int, int] = (1, 2, 2)  # pooling of the (frames, h, w) token grid
    backend: str = "auto"  # attention_pool backend

    def check(self, num_inference_steps: int) -> None:
        if not 0 <= self.guide_steps <= num_inference_steps:
            raise ValueError(
                f"guide_steps must be between 0 and num_inference_steps ({num_inference_steps}), got {self.guide_steps}"
            )
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if not torch.isfinite(torch.tensor(self.strength)) or self.strength < 0:
            raise ValueError(f"guidance strength must be finite and >= 0, got {self.strength}")


@dataclass
class GuidedStep:
    step: int
    iteration: int
    loss: torch.Tensor  # [B] objective before this update
    maps: torch.Tensor  # [B, layers, frames, h, w, T] the maps it was computed from
    skipped: torch.Tensor  # [B] bool: non-finite gradient, update skipped


class _StopForward(Exception):
    """Raised after the last recorded block: the rest of the network cannot change the loss."""


def _stop_after(block: torch.nn.Module):
    def hook(module, args, output):
        raise _StopForward

    return block.register_forward_hook(hook)


def _normalize(grad: torch.Tensor, how: str) -> torch.Tensor:
    if how == "none":
        return grad
    dims = tuple(range(1, grad.dim()))
    scale = grad.square().mean(dims, keepdim=True).sqrt() if how == "rms" else grad.abs().amax(dims, keepdim=True)
    return grad / scale.clamp_min(1e-20)


@dataclass
class Denoiser:
    """Everything one denoising step needs from the pipeline: its transformer, embeddings and CFG."""

    transformer: torch.nn.Module
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    guidance_scale: float
    attention_kwargs: dict | None = None

    def predict(self, latents: torch.Tensor, t: torch.Tensor, step: int, sigma: float, total: int) -> torch.Tensor:
        """The noise prediction of WanPipeline for one step, classifier-free guidance included."""
        model, dtype = self.transformer, self.transformer.dtype
        timestep = t.expand(latents.shape[0])
        context = {"step_index": step, "sigma": sigma, "num_inference_steps": total}
        with model.cache_context("cond", **context):
            noise = model(hidden_states=latents.to(dtype), timestep=timestep, encoder_hidden_states=self.prompt_embeds,
                          attention_kwargs=self.attention_kwargs, return_dict=False)[0]  # fmt: skip
        if self.negative_prompt_embeds is not None and self.guidance_scale > 1.0:
            with model.cache_context("uncond", **context):
                uncond = model(hidden_states=latents.to(dtype), timestep=timestep,
                               encoder_hidden_states=self.negative_prompt_embeds,
                               attention_kwargs=self.attention_kwargs, return_dict=False)[0]  # fmt: skip
            noise = uncond + self.guidance_scale * (noise - uncond)
        return noise

    def score(self, latents, t, objective: Objective, bound: BoundComposition, config: GuidanceConfig):
        """Objective value `[B]` and maps at `latents`, differentiable with respect to `latents`."""
        layers = resolve_layers(self.transformer, config.layers)
        with record_maps(self.transformer, bound.tokens, layers, config.pool, backend=config.backend) as recorder:
            stop = _stop_after(self.transformer.blocks[layers[-1]])
            try:
                self.transformer(hidden_states=latents.to(self.transformer.dtype), timestep=t.expand(latents.shape[0]),
                                 encoder_hidden_states=self.prompt_embeds, return_dict=False)  # fmt: skip
            except _StopForward:
                pass
            finally:
                stop.remove()
            maps = recorder.stacked().float()
        return objective(maps, bound), maps


def guided_update(
    denoiser: Denoiser,
    latents: torch.Tensor,
    t: torch.Tensor,
    objective: Objective,
    bound: BoundComposition,
    config: GuidanceConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of latent descent: returns (new latents, loss [B], maps, skipped [B])."""
    latents = latents.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, maps = denoiser.score(latents, t, objective, bound, config)
        (grad,) = torch.autograd.grad(loss.sum(), latents)
    finite = torch.isfinite(grad).flatten(1).all(dim=1) & torch.isfinite(loss)
    if not finite.all():
        warnings.warn(
            f"cvg: non-finite guidance gradient for batch items {(~finite).nonzero().flatten().tolist()}; "
            "their update is skipped",
            RuntimeWarning,
            stacklevel=2,
        )
    mask = finite.view(-1, *([1] * (latents.dim() - 1)))
    step = torch.where(mask, _normalize(torch.nan_to_num(grad), config.normalize), 0.0)
    return (latents - config.strength * step).detach(), loss.detach(), maps.detach(), ~finite


def denoise(
    denoiser: Denoiser,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    objective: Objective | None,
    bound: BoundComposition | None,
    config: GuidanceConfig,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: Callable | None = None,
) -> tuple[torch.Tensor, list[GuidedStep]]:
    """The denoising loop. `on_step(i, t, latents)` sees the latents after each scheduler step."""
    history: list[GuidedStep] = []
    total = len(timesteps)
    steps = progress(enumerate(timesteps), total) if progress else enumerate(timesteps)
    for i, t in steps:
        if objective is not None and i < config.guide_steps:
            for it in range(config.iterations):
                latents, loss, maps, skipped = guided_update(denoiser, latents, t, objective, bound, config)
                history.append(GuidedStep(i, it, loss, maps, skipped))
        with torch.no_grad():
            noise = denoiser.predict(latents, t, i, float(scheduler.sigmas[i]), total)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, t, latents)
    return latents, history
