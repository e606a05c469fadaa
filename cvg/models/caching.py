"""diffusers' step caches (`FirstBlockCacheConfig`, `MagCacheConfig`, `TaylorSeerCacheConfig`, ... through
`transformer.enable_cache`) on the later, unguided steps only. A guided step differentiates the forward at
its own latent, so no cached residual may stand in for it; the cache starts empty after the last guided
step and is removed when the call ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import FirstBlockCacheConfig


@contextmanager
def cached_after(
    transformer: torch.nn.Module, config: object | None, first_step: int
) -> Iterator[Callable[[int], None]]:
    """Yields `step_done(i)`, to be called after each denoising step: the cache `config` (None: none) is
    enabled once step `first_step - 1` is done (at once when `first_step` is 0), and disabled on the way
    out, whatever raised."""
    if config is None:
        yield lambda i: None
        return
    if transformer.is_cache_enabled:
        raise ValueError(
            f"the transformer already runs a {type(transformer._cache_config).__name__}; disable it "
            "(transformer.disable_cache()) before asking cvg for one"
        )
    if isinstance(config, FirstBlockCacheConfig) and len(getattr(transformer, "blocks", ())) < 2:
        raise ValueError(
            "FirstBlockCache needs a transformer of at least 2 blocks (it skips the blocks after the first)"
        )

    def step_done(i: int) -> None:
        if i + 1 == first_step:
            transformer.enable_cache(config)

    try:
        if first_step == 0:
            transformer.enable_cache(config)
        yield step_done
    finally:
        if transformer.is_cache_enabled:  # ours: none was on at the start
            transformer.disable_cache()
