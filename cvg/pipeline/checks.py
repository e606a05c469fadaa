"""What a model refuses of a request, found before any work: its patch and frame multiples, its text length,
its experts, and pooling tiles its token grid can hold."""

from __future__ import annotations

import torch

from cvg.models.families import Adapter
from cvg.request import MAX_TEXT_TOKENS, GenerationRequest


def check_request(
    pipe, adapter: Adapter, request: GenerationRequest, latents: torch.Tensor | None, pool: tuple[int, int, int] | None
) -> None:
    """What this model refuses of a resolved request (`resolved`): the wrapped pipeline's checks, and what it
    lets through silently: sizes of the wrong multiple, frame counts the VAE rounds down, a second scale
    without a second expert, text longer than the tokenizer's, non-finite latents, and (guided) pooling
    tiles wider than the token grid, whose maps could not say where anything is."""
    r = request
    spatial = adapter.spatial_multiple(pipe)
    for name, value in (("height", r.height), ("width", r.width)):
        if value < spatial or value % spatial:
            raise ValueError(
                f"{name} must be a positive multiple of {spatial}, got {value} ({_nearest(value, spatial, 0)})"
            )
    temporal = pipe.vae_scale_factor_temporal
    if (r.num_frames - 1) % temporal:
        raise ValueError(
            f"num_frames must be {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, ...), got {r.num_frames} "
            f"({_nearest(r.num_frames, temporal, 1)})"
        )
    _check_rotary_reach(pipe, adapter, r)
    if r.guidance_scale_2 is not None and getattr(pipe.config, "boundary_ratio", None) is None:
        raise ValueError("guidance_scale_2 is for two-expert Wan 2.2 pipelines (a boundary_ratio); this has none")
    limit = min(pipe.tokenizer.model_max_length if pipe.tokenizer is not None else MAX_TEXT_TOKENS, MAX_TEXT_TOKENS)
    if r.max_sequence_length > limit:
        raise ValueError(f"max_sequence_length must be between 1 and {limit}, got {r.max_sequence_length}")
    if latents is not None:
        _check_latents(pipe, adapter, r, latents)
    adapter.check_pipeline_inputs(pipe, r.prompt, r.negative_prompt, r.height, r.width)
    if pool is not None:
        grid = adapter.token_grid(pipe, r.height, r.width, r.num_frames)
        for axis, size, factor in zip(("frames", "height", "width"), grid, pool, strict=True):
            if factor > size:
                raise ValueError(f"pool {tuple(pool)} is wider than the token grid {grid} along {axis}")


def _nearest(value: int, step: int, offset: int) -> str:
    """The allowed sizes either side of `value` (`step * k + offset`, positive; a multiple at least `step`),
    said as what would do."""
    below = (value - offset) // step * step + offset
    fits = [size for size in (below, below + step) if size >= max(step if offset == 0 else 1, 1)]
    return " or ".join(map(str, fits)) + " would do"


def _check_rotary_reach(pipe, adapter: Adapter, r: GenerationRequest) -> None:
    """A token grid longer on some axis than the transformer's rotary table (Wan's `rope_max_seq_len`) fails
    deep in the model with a reshape error; named here with the size that would fit."""
    transformer = getattr(pipe, "transformer", None)
    reach = getattr(getattr(transformer, "config", None), "rope_max_seq_len", None)
    if reach is None:
        return
    grid = adapter.token_grid(pipe, r.height, r.width, r.num_frames)
    spatial, temporal = adapter.spatial_multiple(pipe), pipe.vae_scale_factor_temporal
    largest = {
        "num_frames": (reach * transformer.config.patch_size[0] - 1) * temporal + 1,
        "height": reach * spatial,
        "width": reach * spatial,
    }
    asked = (("num_frames", r.num_frames), ("height", r.height), ("width", r.width))
    for (name, value), size in zip(asked, grid, strict=True):
        if size > reach:
            raise ValueError(
                f"{name} {value} is {size} tokens along its axis; this model's rotary embedding reaches "
                f"{reach} (rope_max_seq_len): {name} at most {largest[name]}"
            )


def _check_latents(pipe, adapter: Adapter, r: GenerationRequest, latents: torch.Tensor) -> None:
    """Given latents must be finite and of the shape this request's noise would have (checked on the meta
    device: no memory), or the transformer fails with a convolution's shape error."""
    prompts = 1 if isinstance(r.prompt, str) else len(r.prompt)
    batch = prompts * r.num_videos_per_prompt
    meta = torch.device("meta")
    expected = adapter.prepare_latents(pipe, batch, r.height, r.width, r.num_frames, meta, None, None).shape
    if tuple(latents.shape) != tuple(expected):
        raise ValueError(
            f"latents have shape {list(latents.shape)}; this request's are {list(expected)} "
            "(batch, channels, latent frames, height, width)"
        )
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain non-finite values")
