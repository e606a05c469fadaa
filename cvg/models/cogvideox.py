"""CogVideoX in diffusers, as `CogVideoXPipeline.__call__` runs it: loading a local directory, its latents
`[B, F, C, H, W]` (frames padded to the temporal patch for CogVideoX 1.5), the rotary embeddings of the
video grid, the scheduler's step behind the one-call interface the guided sampler uses, and the decode.
Its joint attention is recorded in `cvg.models.joint_attention`."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline


def load_cogvideox_pipeline(
    path: str | Path,
    transformer_dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    **kwargs,
) -> CogVideoXPipeline:
    """`CogVideoXPipeline.from_pretrained` on a local directory; the transformer and the VAE in the
    precisions given (float32 by default), the rest in float32."""
    if transformer_dtype is not None or vae_dtype is not None:
        if "dtype" in kwargs or "torch_dtype" in kwargs:
            raise ValueError("give transformer_dtype/vae_dtype or diffusers' dtype, not both")
        kwargs["dtype"] = {
            "transformer": transformer_dtype or torch.float32,
            "vae": vae_dtype or torch.float32,
            "default": torch.float32,
        }
    return CogVideoXPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)


def padding_frames(pipe: CogVideoXPipeline, num_frames: int) -> int:
    """Latent frames CogVideoXPipeline adds so that their count divides the temporal patch (CogVideoX 1.5;
    0 for 1.0, which has none). They are generated and dropped before the decode."""
    patch = pipe.transformer.config.patch_size_t
    latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    return 0 if patch is None or latent_frames % patch == 0 else patch - latent_frames % patch


def prepare_latents(
    pipe: CogVideoXPipeline,
    batch: int,
    height: int,
    width: int,
    num_frames: int,
    device: torch.device,
    generator,
    latents: torch.Tensor | None,
) -> torch.Tensor:
    """The initial latents `[B, F, C, H, W]` in float32, drawn as CogVideoXPipeline draws them."""
    num_frames += padding_frames(pipe, num_frames) * pipe.vae_scale_factor_temporal
    channels = pipe.transformer.config.in_channels
    return pipe.prepare_latents(batch, channels, num_frames, height, width, torch.float32, device, generator, latents)


def rotary_embeddings(pipe: CogVideoXPipeline, latents: torch.Tensor) -> dict:
    """The transformer's `image_rotary_emb` for latents `[B, F, C, H, W]` (none where the model has
    positional embeddings instead), made by the pipeline's own method."""
    if not pipe.transformer.config.use_rotary_positional_embeddings:
        return {}
    _, frames, _, height, width = latents.shape
    scale = pipe.vae_scale_factor_spatial
    return {
        "image_rotary_emb": pipe._prepare_rotary_positional_embeddings(
            height * scale, width * scale, frames, latents.device
        )
    }


class CogVideoXSolver:
    """CogVideoX's scheduler behind `step(noise, t, latents, return_dict=False)`, with the arguments
    CogVideoXPipeline passes: `eta` and the generator (CogVideoXDPMScheduler draws noise every step), and for
    CogVideoXDPMScheduler the previous step's timestep and predicted sample. `sigmas[i]` is step i's noise
    level on the flow-matching scale `GuidanceConfig.guide_sigma` is read in (Wan's): the σ of
    (1 - σ)·x0 + σ·ε with the same signal-to-noise ratio as √ᾱ·x0 + √(1 - ᾱ)·ε, σ = √(1 - ᾱ) / (√ᾱ + √(1 - ᾱ))."""

    def __init__(self, scheduler, generator=None, eta: float = 0.0):
        self.scheduler = scheduler
        accepted = inspect.signature(scheduler.step).parameters
        self.kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (timestep, predicted sample)
        # Per step of the schedule set before this solver is made, then 0 (as flow-matching schedulers list them).
        alpha = scheduler.alphas_cumprod[scheduler.timesteps.cpu().long()].double()
        signal, noise = alpha.sqrt(), (1 - alpha).sqrt()
        self.sigmas = torch.cat([noise / (signal + noise), torch.zeros(1, dtype=alpha.dtype)]).float()

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def step(self, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, return_dict: bool = False) -> tuple:
        if not isinstance(self.scheduler, CogVideoXDPMScheduler):
            return self.scheduler.step(noise, t, latents, **self.kwargs, return_dict=False)
        back, old = self.previous if self.previous is not None else (None, None)
        latents, predicted = self.scheduler.step(noise, old, t, back, latents, **self.kwargs, return_dict=False)
        self.previous = (t, predicted)
        return (latents,)


@torch.no_grad()
def decode_latents(pipe: CogVideoXPipeline, latents: torch.Tensor, num_frames: int, output_type: str):
    """CogVideoXPipeline's decode: drop the padding frames, VAE decode, post-process to `output_type`."""
    latents = latents[:, padding_frames(pipe, num_frames) :].to(pipe.vae.device, pipe.vae.dtype)
    video = pipe.decode_latents(latents)
    return pipe.video_processor.postprocess_video(video=video.float(), output_type=output_type)
