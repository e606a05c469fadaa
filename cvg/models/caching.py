"""diffusers' step caches (`FirstBlockCacheConfig`, `MagCacheConfig`, `TaylorSeerCacheConfig`, ... through
`transformer.enable_cache`) on the later, unguided steps only. A guided step differentiates the forward at
its own latent, so no cached residual may stand in for it; the cache starts empty after the last guided
step and is removed when the call ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

from cvg.request import PipelineOptions

# The modules TaylorSeer predicts on Wan: each block's attentions and feed-forward. diffusers' defaults
# (`blocks.*attn`) match no Wan module name (they end in attn1, attn2).
WAN_TAYLORSEER_MODULES = [r"^blocks\.\d+\.(attn1|attn2|ffn)$"]


def step_cache(options: PipelineOptions) -> FirstBlockCacheConfig | TaylorSeerCacheConfig | None:
    """The diffusers cache config the options' step cache names (None: none)."""
    if options.first_block_cache is not None:
        return FirstBlockCacheConfig(threshold=options.first_block_cache)
    if options.taylorseer_cache is not None:
        return TaylorSeerCacheConfig(cache_interval=options.taylorseer_cache, cache_identifiers=WAN_TAYLORSEER_MODULES)
    return None


@contextmanager
def cached_after(
    transformer: torch.nn.Module, config: object | None, first_step: int, served_steps: int | None = None
) -> Iterator[Callable[[int], None]]:
    """Yields `step_done(i)`, to be called after each denoising step: the cache `config` (None: none) is
    enabled once step `first_step - 1` is done (at once when `first_step` is 0), and disabled on the way
    out, whatever raised. `served_steps`: how many steps the cache will serve (MagCache's ratios are per
    served step)."""
    if config is None:
        yield lambda i: None
        return
    if transformer.is_cache_enabled:
        raise ValueError(
            f"the transformer already runs a {type(transformer._cache_config).__name__}; disable it "
            "(transformer.disable_cache()) before asking cvg for one"
        )
    check_cache(transformer, config, served_steps)

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


def check_cache(transformer: torch.nn.Module, config: object, served_steps: int | None = None) -> None:
    """A one-line ValueError where `config` would do nothing or the wrong thing on `transformer`, before any
    step runs: FirstBlockCache on one block; MagCache calibrated for another number of served steps (its
    ratios are indexed by the step it serves); a cache whose module patterns match nothing here (diffusers'
    TaylorSeer defaults name `blocks.*attn`, which no Wan module's name ends with: it would run uncached,
    silently)."""
    if isinstance(config, FirstBlockCacheConfig) and len(getattr(transformer, "blocks", ())) < 2:
        raise ValueError(
            "FirstBlockCache needs a transformer of at least 2 blocks (it skips the blocks after the first)"
        )
    if isinstance(config, MagCacheConfig) and served_steps is not None and config.num_inference_steps != served_steps:
        raise ValueError(
            f"MagCacheConfig(num_inference_steps={config.num_inference_steps}): the cache serves {served_steps} "
            f"steps here (those after the guided ones); calibrate and set num_inference_steps={served_steps}"
        )
    transformer.enable_cache(config)
    try:
        hooked = sum(
            bool(getattr(m, "_diffusers_hook", None) and m._diffusers_hook._hook_order) for m in transformer.modules()
        )
    finally:
        transformer.disable_cache()
    if not hooked:
        hint = f" (for Wan: cache_identifiers={WAN_TAYLORSEER_MODULES}, or use_lite_mode=True)"
        raise ValueError(
            f"{type(config).__name__} hooks no module of this {type(transformer).__name__}, so nothing would be "
            f"cached{hint if isinstance(config, TaylorSeerCacheConfig) else ''}"
        )
