"""The pipelines cvg guides, and all that the sampler and `CVGPipeline` need to know of each: one adapter
per family of diffusers pipeline.

  wan2.1        WanPipeline, one transformer for every step
  wan2.2-a14b   WanPipeline with two experts (`transformer`, `transformer_2`): the first serves the
                timesteps at or above `boundary_ratio` x the scheduler's training timesteps, the second the rest
  wan2.2-ti2v   WanPipeline with a timestep per video token (`expand_timesteps`; TI2V-5B, whose VAE has 48
                latent channels)
  cogvideox     CogVideoXPipeline: text tokens before video tokens in one joint attention, latents
                `[B, F, C, H, W]`, rotary embeddings of the video grid, DDIM or DPM schedulers

An adapter says where the text attention is and how its maps are recorded (`map_recorder`, `recording`),
how the pipeline draws latents, encodes text, steps its scheduler and decodes, and which transformer serves
which step (`experts`). `directory_family` reads a saved pipeline's `model_index.json`, so that an
unsupported pipeline, or a two-expert one with an expert missing, is a one-line error before any weight is
loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch
from diffusers import (
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from cvg.io.files import read_json_object
from cvg.models import cogvideox, wan
from cvg.models.joint_attention import JointMapRecorder, joint_recording
from cvg.models.processors import MapRecorder, recording
from cvg.ops.pooling import PoolSpec

WAN_FAMILIES = ("wan2.1", "wan2.2-a14b", "wan2.2-ti2v")
FAMILIES = (*WAN_FAMILIES, "cogvideox")


class AttentionMapRecorder(Protocol):
    """What a family's map recorder does: the processors `recording` installs pool the attention maps of
    `tokens` into `maps` while the transformer runs (Wan: `MapRecorder`, CogVideoX: `JointMapRecorder`)."""

    tokens: torch.Tensor  # [T] text token indices
    pool: tuple[int, int, int]  # pooling of the frames, height, width token grid
    backend: str  # the attention_pool backend
    grid: tuple[int, int, int] | None  # the video-token grid of the current forward
    tiles: tuple[int, int, int] | None  # the pooled grid
    maps: dict[int, torch.Tensor]  # layer -> [B, (heads,) tiles, T] of the current forward

    def set_grid(self, grid: tuple[int, int, int], device: torch.device) -> None:
        """Start a forward over `grid` on `device` (maps cleared; the pooling kept while the grid holds)."""

    def spec(self, keys: int, device: torch.device) -> PoolSpec:
        """The pooling for text of `keys` keys, made once per grid."""

    def stacked(self) -> torch.Tensor:
        """What was recorded: `[B, layers, heads, tiles_f, tiles_h, tiles_w, T]`."""


class FamilyAdapter(Protocol):
    """What cvg needs of a family of diffusers pipelines: a class of static methods and constants (the
    adapters are never instantiated). `tests/test_families.py` checks every adapter against it; to add a
    family, write one (`docs/extending.md`) and add it to `ADAPTERS`."""

    pipeline_class: type  # the diffusers pipeline class it wraps
    transformer_class: type  # its denoiser's class
    zero_text_padding: bool  # text padding rows are zeros (cvg.models.padding collapses them exactly)
    step_engines: bool  # cvg.runtime's step backends, guided graphs and diffusers' step caches run it
    flow: bool  # its transformer predicts the flow velocity e - x0 at x = (1 - s) x0 + s e, s = timestep / 1000
    batched_cfg: bool  # its pipeline runs both CFG forwards as one batch
    label: str  # how errors name it
    default_size: dict[str, int]  # height, width, num_frames
    text_length: int  # its pipeline's max_sequence_length

    @staticmethod
    def map_recorder(
        transformer, tokens, pool, backend: str, key_bias: torch.Tensor | None
    ) -> AttentionMapRecorder: ...
    @staticmethod
    def recording(transformer, recorder, layers: Sequence[int]) -> AbstractContextManager: ...
    @staticmethod
    def video_tokens(transformer, latents: torch.Tensor) -> int: ...
    @staticmethod
    def name(pipe) -> str: ...
    @staticmethod
    def experts(pipe) -> dict[str, torch.nn.Module]: ...
    @staticmethod
    def clean_prompt(text: str) -> str: ...
    @staticmethod
    def text_embeds(pipe, prompts: list[str], videos: int, length: int, device, dtype) -> torch.Tensor: ...
    @staticmethod
    def prepare_latents(pipe, batch: int, height: int, width: int, num_frames: int, device, generator, latents): ...
    @staticmethod
    def forward_kwargs(pipe, latents: torch.Tensor) -> dict: ...
    @staticmethod
    def solver(pipe, generator): ...
    @staticmethod
    def decode(pipe, latents: torch.Tensor, num_frames: int, output_type: str): ...
    @staticmethod
    def token_grid(pipe, height: int, width: int, num_frames: int) -> tuple[int, int, int]: ...
    @staticmethod
    def spatial_multiple(pipe) -> int: ...
    @staticmethod
    def check_pipeline_inputs(pipe, prompt, negative_prompt, height: int, width: int) -> None: ...
    @staticmethod
    def load(path: Path, **kwargs): ...


def family(boundary_ratio: float | None, expand_timesteps: bool) -> str:
    """The family of a WanPipeline with this config (two experts need a boundary: WanPipeline runs a
    pipeline without one on `transformer` alone)."""
    if expand_timesteps:
        return "wan2.2-ti2v"
    return "wan2.1" if boundary_ratio is None else "wan2.2-a14b"


class WanAdapter:
    """Wan 2.1 and 2.2: cross-attention (`attn2`) over text zero-padded to 512 tokens, latents
    `[B, C, F, H, W]`, flow-matching schedulers that step with one call."""

    pipeline_class = WanPipeline
    transformer_class = WanTransformer3DModel
    zero_text_padding = True  # padding rows are zeros: `cvg.models.padding` collapses them exactly
    step_engines = True  # `cvg.runtime`'s engines, guided graphs and diffusers' step caches run it
    flow = True  # flow matching (UniPC with flow sigmas): the velocity, at sigma = timestep / 1000
    batched_cfg = False  # WanPipeline runs the conditional and unconditional forwards apart
    label = "Wan pipeline"
    default_size = {"height": 480, "width": 832, "num_frames": 81}  # Wan 2.1's
    text_length = 512  # WanPipeline's max_sequence_length

    # What guided forwards read: the text attention's maps.
    @staticmethod
    def map_recorder(transformer, tokens, pool, backend: str, key_bias: torch.Tensor | None) -> MapRecorder:
        return MapRecorder.for_transformer(transformer, tokens, pool, backend=backend, key_bias=key_bias)

    @staticmethod
    def recording(transformer, recorder, layers: Sequence[int]) -> AbstractContextManager:
        return recording(transformer, recorder, layers)

    @staticmethod
    def video_tokens(transformer, latents: torch.Tensor) -> int:
        """Video tokens per item of `latents` `[B, C, F, H, W]`."""
        return latents[0, 0].numel() // math.prod(transformer.config.patch_size)

    # What CVGPipeline runs around them.
    @staticmethod
    def name(pipe) -> str:
        return family(pipe.config.boundary_ratio, pipe.config.expand_timesteps)

    @staticmethod
    def experts(pipe) -> dict[str, torch.nn.Module]:
        """`transformer`, and for a two-expert Wan 2.2 pipeline `transformer_2` (its low-noise expert;
        WanPipeline ignores one without `boundary_ratio`)."""
        if pipe.config.boundary_ratio is None:
            return {"transformer": pipe.transformer}
        return {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}

    clean_prompt = staticmethod(prompt_clean)

    @staticmethod
    def text_embeds(pipe, prompts: list[str], videos: int, length: int, device, dtype) -> torch.Tensor:
        """WanPipeline's embeddings, with the encoder run over the prompts' own tokens (equal to float
        rounding: Wan zeroes the padding rows)."""
        return wan.trimmed_prompt_embeds(pipe, prompts, videos, length, device, dtype)

    @staticmethod
    def prepare_latents(pipe, batch: int, height: int, width: int, num_frames: int, device, generator, latents):
        channels = pipe.transformer.config.in_channels
        return pipe.prepare_latents(
            batch, channels, height, width, num_frames, torch.float32, device, generator, latents
        )

    @staticmethod
    def forward_kwargs(pipe, latents: torch.Tensor) -> dict:
        return {}

    @staticmethod
    def solver(pipe, generator):
        pipe.scheduler.set_begin_index(0)
        return pipe.scheduler

    @staticmethod
    def decode(pipe, latents: torch.Tensor, num_frames: int, output_type: str):
        return wan.decode_latents(pipe, latents, output_type)

    @staticmethod
    def token_grid(pipe, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        patch = pipe.transformer.config.patch_size
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        spatial = pipe.vae_scale_factor_spatial
        return latent_frames // patch[0], height // (spatial * patch[1]), width // (spatial * patch[2])

    @staticmethod
    def spatial_multiple(pipe) -> int:
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]

    @staticmethod
    def check_pipeline_inputs(pipe, prompt, negative_prompt, height: int, width: int) -> None:
        pipe.check_inputs(prompt, negative_prompt, height, width)

    @staticmethod
    def load(path: Path, **kwargs):
        return wan.load_wan_pipeline(path, **kwargs)


class CogVideoXAdapter:
    """CogVideoX 1.0 and 1.5: joint attention (`attn1`) over text then video tokens, T5 text padded with
    the encoder's own padding embeddings (not zeros: no collapse), latents `[B, F, C, H, W]`."""

    pipeline_class = CogVideoXPipeline
    transformer_class = CogVideoXTransformer3DModel
    zero_text_padding = False
    step_engines = False
    flow = False  # v-prediction on a DDPM schedule
    batched_cfg = True  # CogVideoXPipeline runs them as one batch
    label = "CogVideoX pipeline"
    default_size = {"height": 480, "width": 720, "num_frames": 49}
    text_length = 226  # CogVideoXPipeline's max_sequence_length

    @staticmethod
    def map_recorder(transformer, tokens, pool, backend: str, key_bias: torch.Tensor | None) -> JointMapRecorder:
        if key_bias is not None:
            raise ValueError("CogVideoX's joint attention takes no text key bias (its padding is not zeros)")
        return JointMapRecorder.for_transformer(transformer, tokens, pool, backend=backend)

    @staticmethod
    def recording(transformer, recorder, layers: Sequence[int]) -> AbstractContextManager:
        return joint_recording(transformer, recorder, layers)

    @staticmethod
    def video_tokens(transformer, latents: torch.Tensor) -> int:
        """Video tokens per item of `latents` `[B, F, C, H, W]`."""
        config = transformer.config
        _, frames, _, height, width = latents.shape
        return frames // (config.patch_size_t or 1) * (height // config.patch_size) * (width // config.patch_size)

    @staticmethod
    def name(pipe) -> str:
        return "cogvideox"

    @staticmethod
    def experts(pipe) -> dict[str, torch.nn.Module]:
        return {"transformer": pipe.transformer}

    @staticmethod
    def clean_prompt(text: str) -> str:  # CogVideoXPipeline tokenizes prompts as given
        return text

    @staticmethod
    def text_embeds(pipe, prompts: list[str], videos: int, length: int, device, dtype) -> torch.Tensor:
        """CogVideoXPipeline's own: the encoder runs over the padding too, which then is not zeros."""
        return CogVideoXPipeline._get_t5_prompt_embeds(pipe, prompts, videos, length, device, dtype)

    prepare_latents = staticmethod(cogvideox.prepare_latents)
    forward_kwargs = staticmethod(cogvideox.rotary_embeddings)

    @staticmethod
    def solver(pipe, generator):
        return cogvideox.CogVideoXSolver(pipe.scheduler, generator)

    decode = staticmethod(cogvideox.decode_latents)

    @staticmethod
    def token_grid(pipe, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        config = pipe.transformer.config
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        latent_frames += cogvideox.padding_frames(pipe, num_frames)
        side = pipe.vae_scale_factor_spatial * config.patch_size
        return latent_frames // (config.patch_size_t or 1), height // side, width // side

    @staticmethod
    def spatial_multiple(pipe) -> int:
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size

    @staticmethod
    def check_pipeline_inputs(pipe, prompt, negative_prompt, height: int, width: int) -> None:
        pipe.check_inputs(prompt, height, width, negative_prompt, None)

    @staticmethod
    def load(path: Path, **kwargs):
        return cogvideox.load_cogvideox_pipeline(path, **kwargs)


ADAPTERS = (WanAdapter, CogVideoXAdapter)
Adapter = type[FamilyAdapter]


def pipeline_adapter(pipe) -> Adapter:
    """The adapter of a diffusers pipeline; a pipeline of another class is a one-line TypeError."""
    return _adapter_of(pipe, "pipeline_class")


def transformer_adapter(transformer) -> Adapter:
    """The adapter of a denoising transformer; another module is a one-line TypeError."""
    return _adapter_of(transformer, "transformer_class")


def _adapter_of(instance, kind: str) -> Adapter:
    for adapter in ADAPTERS:
        if isinstance(instance, getattr(adapter, kind)):
            return adapter
    names = " or ".join(getattr(a, kind).__name__ for a in ADAPTERS)
    raise TypeError(f"expected a diffusers {names}, got {type(instance).__name__}")


def directory_family(path: str | Path) -> str:
    """The family of the pipeline saved in `path`, checked against what it holds."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{str(path)!r} is not a diffusers pipeline directory (no model_index.json)")
    index = read_json_object(index_file)
    class_name = index.get("_class_name")
    classes = {a.pipeline_class.__name__: a for a in ADAPTERS}
    if class_name not in classes:
        what = f"holds a {class_name}" if class_name else "names no pipeline class (_class_name)"
        raise ValueError(f"{str(path)!r} {what}; cvg guides {', '.join(classes)} pipelines ({', '.join(FAMILIES)})")
    if classes[class_name] is CogVideoXAdapter:
        name = "cogvideox"
    else:
        name = family(index.get("boundary_ratio"), bool(index.get("expand_timesteps")))
    experts = ("transformer", "transformer_2") if name == "wan2.2-a14b" else ("transformer",)
    for expert in experts:
        entry = index.get(expert)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None or not (path / expert).is_dir():
            what = "its low-noise expert" if expert == "transformer_2" else "its transformer"
            raise ValueError(f"the {name} pipeline in {str(path)!r} lacks {expert}, {what}")
    return name


def directory_adapter(path: str | Path) -> Adapter:
    """The adapter of the pipeline saved in `path` (`directory_family`'s checks first)."""
    return CogVideoXAdapter if directory_family(path) == "cogvideox" else WanAdapter
