"""Wan in diffusers: loading a local pipeline directory (with cvg's generator manifest), the latent
normalisation and VAE decode WanPipeline applies, the video size a model was trained for, and keys that
name a model's weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from cvg.io.files import read_json_object
from cvg.models.minilm import PACKAGE, load_minilm
from cvg.models.processors import resolve_layers
from cvg.models.vae_cpu import cpu_decoding

MANIFEST = "generator.json"  # beside a saved WanPipeline: which packaged text encoder it was trained with


def load_wan_pipeline(
    path: str | Path,
    transformer_dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype | None = None,
    **kwargs,
) -> WanPipeline:
    """`WanPipeline.from_pretrained` on a local directory, with the packaged MiniLM put back where the
    directory's `generator.json` names it in place of a saved text encoder (cvg's trained generators).
    `transformer_dtype` loads the transformer (both experts of Wan 2.2 A14B) in that precision (diffusers
    keeps its norms, time embedding and modulation in float32); the VAE's precision is chosen apart
    (`vae_dtype`, default float32: decode quality matters more than its time), the rest loads in float32."""
    path = Path(path)
    if transformer_dtype is not None or vae_dtype is not None:
        if "dtype" in kwargs or "torch_dtype" in kwargs:
            raise ValueError("give transformer_dtype/vae_dtype or diffusers' dtype, not both")
        kwargs["dtype"] = {
            "transformer": transformer_dtype or torch.float32,
            "transformer_2": transformer_dtype or torch.float32,  # Wan 2.2's low-noise expert, where there is one
            "vae": vae_dtype or torch.float32,
            "default": torch.float32,
        }
    manifest = path / MANIFEST
    if manifest.is_file() and read_json_object(manifest).get("text_encoder") == PACKAGE:
        if "text_encoder" not in kwargs:
            kwargs["tokenizer"], kwargs["text_encoder"] = load_minilm()
    return WanPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)


@torch.no_grad()
def cast_transformer(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a built transformer as `from_pretrained(dtype=)` loads one: parameters and buffers under the
    modules the class keeps in float32 (`_keep_in_fp32_modules`: Wan's norms, time embedding and
    modulation) stay float32, the rest take `dtype` (diffusers' rule on parameter names)."""
    keep = getattr(transformer, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
        if tensor.is_floating_point():
            kept = any(module in name.split(".") for module in keep)
            tensor.data = tensor.data.to(torch.float32 if kept else dtype)
    return transformer


@torch.no_grad()
def trimmed_prompt_embeds(
    pipe: WanPipeline,
    prompt: str | list[str],
    num_videos_per_prompt: int = 1,
    max_sequence_length: int = 226,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`WanPipeline._get_t5_prompt_embeds` with the text encoder run over the prompts' tokens only (padded
    to the longest of them, not to `max_sequence_length`): the encoder masks padding out of its attention
    and Wan zeroes its rows anyway, so the result is the same to float rounding, and a 12-token prompt
    costs 12 tokens of encoder, not 512."""
    prompts = [prompt_clean(p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
    inputs = pipe.tokenizer(
        prompts,
        padding="longest",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    encoder = pipe.text_encoder
    embeds = encoder(inputs.input_ids.to(encoder.device), inputs.attention_mask.to(encoder.device)).last_hidden_state
    embeds = embeds * inputs.attention_mask.to(embeds.device, embeds.dtype)[..., None]  # Wan's zero rows
    embeds = torch.nn.functional.pad(embeds, (0, 0, 0, max_sequence_length - embeds.shape[1]))
    embeds = embeds.to(device=device or pipe._execution_device, dtype=dtype or encoder.dtype)
    return embeds.repeat_interleave(num_videos_per_prompt, dim=0)


def latent_normalisation(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) `[1, C, 1, 1, 1]` by which WanPipeline normalises the VAE's latents."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)


@torch.no_grad()
def decode_latents(pipe: WanPipeline, latents: torch.Tensor, output_type: str):
    """WanPipeline's decode: un-normalise the latents, VAE decode (fast CPU paths: `cvg.models.vae_cpu`),
    post-process to `output_type`."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    mean, std = (x.to(latents.device, latents.dtype) for x in latent_normalisation(vae))
    with cpu_decoding(vae):
        video = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]  # WanPipeline's own arithmetic
    return pipe.video_processor.postprocess_video(video.float(), output_type=output_type)


def video_size(
    path: str | Path,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    default: dict[str, int] | None = None,
) -> dict[str, int]:
    """The size asked for, else the size a cvg-trained model's manifest records, else `default` (Wan's
    480x832x81 when not given)."""
    manifest = Path(path) / MANIFEST
    recipe = read_json_object(manifest).get("recipe", {}) if manifest.is_file() else {}
    default = default or {"height": 480, "width": 832, "num_frames": 81}
    return {
        "height": recipe.get("size", default["height"]) if height is None else height,
        "width": recipe.get("size", default["width"]) if width is None else width,
        "num_frames": recipe.get("frames", default["num_frames"]) if num_frames is None else num_frames,
    }


def generator_description(transformer: torch.nn.Module, layers: list[int] | None, pool: tuple[int, int, int]) -> dict:
    """What a classifier trained on this generator's maps is bound to: its weights (as bfloat16, so one
    trained on the float32 model guides its bfloat16 load too), recorded layers, pooling."""
    return {
        "transformer": model_key(transformer, torch.bfloat16),
        "layers": list(resolve_layers(transformer, layers)),
        "pool": list(pool),
    }


def to_pixels(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 [F, H, W, 3] clips as the VAE's input: float [B, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def model_key(transformer: torch.nn.Module, precision: torch.dtype | None = None) -> str:
    """A hash of the transformer's config and weights: cache entries of a changed model are never reused.
    Private config entries (`_name_or_path`, `_diffusers_version`, ...) say where a model was loaded from,
    not what it computes, and are left out: a saved and reloaded model keeps its key. With `precision`,
    floating weights are hashed as rounded to it: a float32 model and its bfloat16 load (diffusers keeps
    some modules in float32) then share the key `precision=torch.bfloat16` gives."""
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in transformer.state_dict().items():
        tensor = tensor.detach().cpu()
        if precision is not None and tensor.is_floating_point():
            tensor = tensor.to(precision)
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
