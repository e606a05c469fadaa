"""What a guided forward keeps for the latent's gradient, and when its blocks are recomputed instead: the
weights frozen for the duration (`frozen`), an upper estimate of the saved activations
(`saved_activation_bytes`), and gradient checkpointing of the transformer blocks past a budget
(`should_checkpoint`, `checkpointing`). The guided sampler (`cvg.guidance.sampler`) runs its recorded
forwards inside these."""

from __future__ import annotations

import torch

from cvg.guidance.config import GuidanceConfig
from cvg.models.families import transformer_adapter
from cvg.models.patching import swapped


def frozen(model: torch.nn.Module):
    """No parameter gradients: the forward then saves only what the latent's gradient needs."""
    return swapped((p, "requires_grad", False) for p in model.parameters())


# Checkpointing costs a second forward of each recorded block: the guided steps ran 19% faster without it
# (bf16, cvg.bench's default size, 4 rounds), where the activations take tens of MB. Past this, memory wins.
ACTIVATION_BUDGET_BYTES = 1 << 30


def saved_activation_bytes(model: torch.nn.Module, latents: torch.Tensor, blocks: int) -> int:
    """An upper estimate of what a forward through the first `blocks` blocks saves for the latent's
    gradient (weights frozen): per video token and block, 16 float32 values per model width and 2 per FFN
    width (measured on Wan blocks with saved-tensor hooks: 14 and 1.5 in float32, fewer bytes in bf16).
    CogVideoX's FFN is 4x its width."""
    config = model.config
    tokens = latents.shape[0] * transformer_adapter(model).video_tokens(model, latents)
    width = config.num_attention_heads * config.attention_head_dim
    ffn = getattr(config, "ffn_dim", None) or 4 * width
    return tokens * blocks * (16 * width + 2 * ffn) * 4


def should_checkpoint(model: torch.nn.Module, config: GuidanceConfig, latents: torch.Tensor, layers) -> bool:
    """The config's choice, else whether a forward through `layers` would save more than the budget."""
    if config.checkpointing is not None:
        return config.checkpointing
    return saved_activation_bytes(model, latents, max(layers) + 1) > ACTIVATION_BUDGET_BYTES


def checkpoint_block(block, *args):
    # Wan's blocks draw no random numbers: no RNG state to stash, which also keeps the step capturable.
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def checkpointing(model: torch.nn.Module, enable: bool):
    """Gradient checkpointing of the transformer blocks for the duration (the switches diffusers'
    `enable_gradient_checkpointing` sets), then the model's own setting back; a model that checkpoints
    already keeps its own function."""
    if not enable or model.gradient_checkpointing:
        return swapped(())
    modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    return swapped(
        [(m, "gradient_checkpointing", True) for m in modules]
        + [(m, "_gradient_checkpointing_func", checkpoint_block) for m in modules]
    )
