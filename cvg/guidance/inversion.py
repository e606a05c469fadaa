"""Flow-matching inversion: clean latents carried up the flow to the noise levels that guidance acts on.

Wan's rectified flow has `x_sigma = (1 - sigma) x0 + sigma noise`, and its transformer predicts the
velocity `noise - x0`. Integrating dx/dsigma = v(x, sigma) upward from the clean latent (sigma 0) under a
prompt gives the noisy latent from which the sampler, run back down under the same prompt, returns to
the clip: the DDIM-inversion idea for flows. Classifier training reads the maps of a clip at the guided
steps' noise levels this way (dual inversion: under its true prompt and under a counterfactual one), or
inverts the clip all the way to noise and replays the sampler's path down from there (`descend`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cvg.guidance.sampler import Denoiser


def _euler(denoiser: Denoiser, latents: torch.Tensor, sigmas: Sequence[float], total: int) -> torch.Tensor:
    """Euler steps of the flow along `sigmas` (either direction); `total` is the grid size for the step index."""
    for i, (here, there) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        t = torch.tensor(here * 1000.0)  # Wan's timesteps are sigmas x num_train_timesteps
        velocity = denoiser.predict(latents, t, i, here, total)
        latents = latents + (there - here) * velocity.to(latents.dtype)
    return latents


def _walk(
    denoiser: Denoiser, latents: torch.Tensor, start: float, sigmas: Sequence[float], substeps: int, rising: bool
) -> list[torch.Tensor]:
    """The latents at each of `sigmas` (monotone in (0, 1], away from `start`), `substeps` Euler steps an
    interval; a level equal to where the walk stands is the latents as they are."""
    ordered = all((a < b) if rising else (a > b) for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
    if not sigmas or not ordered or any(not 0 < s <= 1 for s in sigmas):
        raise ValueError(
            f"sigmas must be {'increasing' if rising else 'decreasing'} values in (0, 1], got {list(sigmas)}"
        )
    if substeps < 1:
        raise ValueError(f"substeps must be at least 1, got {substeps}")
    out, here = [], start
    for target in sigmas:
        if target != here:
            grid = torch.linspace(here, target, substeps + 1, dtype=torch.float64).tolist()
            latents = _euler(denoiser, latents, grid, substeps)
        out.append(latents)
        here = target
    return out


@torch.no_grad()
def invert(denoiser: Denoiser, latents: torch.Tensor, sigmas: Sequence[float], substeps: int = 4) -> list[torch.Tensor]:
    """The latents at each of `sigmas` (increasing, in (0, 1]), integrating up from the clean `latents`
    with `substeps` Euler steps per interval. The velocity is the denoiser's (with classifier-free
    guidance when it has a negative prompt; inversion usually runs without)."""
    return _walk(denoiser, latents, 0.0, sigmas, substeps, rising=True)


@torch.no_grad()
def descend(denoiser: Denoiser, noise: torch.Tensor, sigmas: Sequence[float], substeps: int = 4) -> list[torch.Tensor]:
    """The sampler's path replayed from pure noise (sigma 1): the latents at each of `sigmas` (decreasing,
    in (0, 1]), with `substeps` Euler steps per interval: the mirror of `invert` from its top."""
    return _walk(denoiser, noise, 1.0, sigmas, substeps, rising=False)


@torch.no_grad()
def regenerate(denoiser: Denoiser, latents: torch.Tensor, sigma: float, substeps: int = 4) -> torch.Tensor:
    """The inverse of `invert` to one level: Euler steps from `sigma` down to the clean latent."""
    grid = torch.linspace(sigma, 0.0, substeps + 1, dtype=torch.float64).tolist()
    return _euler(denoiser, latents, grid, substeps)
