"""Classifier readings: pooled maps of clips under their true and counterfactual prompts, at the noise
levels guidance acts on, from the generator's own trajectories or from inverted clips; cached in resumable
chunks (one file per chunk, written atomically). Every reading keeps each head apart and both kinds of
channel (`SLOTS`), so heads that read them differently train on the same readings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from cvg.guidance.binding import BoundComposition
from cvg.guidance.classifier import label_of
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.inversion import descend, invert
from cvg.guidance.sampler import Denoiser
from cvg.io.video import to_uint8
from cvg.models.wan import latent_normalisation, to_pixels
from cvg.pipeline import CVGPipeline
from cvg_research.compshapes.dataset import read_frames, read_index
from cvg_research.compshapes.grammar import Clip, novel_composition
from cvg_research.compshapes.judge import judge
from cvg_research.compshapes.world import render
from cvg_research.training.config import ReadingConfig
from cvg_research.training.loop import cached_chunks


def guided_levels(pipe: WanPipeline, config: ReadingConfig) -> tuple[list[float], list[float]]:
    """(sigmas, timesteps) of the guided steps under the pipeline's own scheduler."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.num_inference_steps)
    steps = range(config.guide_steps)
    return [float(scheduler.sigmas[i]) for i in steps], [float(scheduler.timesteps[i]) for i in steps]


@torch.no_grad()
def encode_clip(pipe: WanPipeline, frames) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` -> the normalised latent WanPipeline denoises, `[1, C, f, h, w]`."""
    mean, std = latent_normalisation(pipe.vae)
    return (pipe.vae.encode(to_pixels([frames])).latent_dist.mean - mean) / std


def _prompt_denoiser(pipe: WanPipeline, prompt: str, config: ReadingConfig) -> Denoiser:
    """The transformer conditioned on `prompt` alone (no classifier-free guidance)."""
    embeds = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=False, max_sequence_length=config.max_sequence_length
    )[0]
    return Denoiser(pipe.transformer, embeds, None, 1.0)


# A reading's last axis: two entity slots (`BoundComposition.entity_maps`, an entity's tokens together), then
# four word slots (`word_maps`: each entity's noun and attributes); slots a composition lacks are zero.
SLOTS = {"entities": slice(0, 2), "words": slice(2, 6)}


def _slots(bound: BoundComposition, maps: torch.Tensor) -> torch.Tensor:
    """Recorded maps `[..., T]` -> `[..., 6]`: entity slots, then word slots (`SLOTS`)."""
    entities, words = bound.entity_maps(maps), bound.word_maps(maps)
    return torch.cat([F.pad(entities, (0, 2 - entities.shape[-1])), F.pad(words, (0, 4 - words.shape[-1]))], -1)


def _map_readings(
    pipe: WanPipeline,
    prompt: str,
    composition,
    config: ReadingConfig,
    latents: Callable[[Denoiser], list[torch.Tensor]],
) -> torch.Tensor:
    """Maps `[steps, layers, heads, f, h, w, 6]` (`SLOTS`) under `prompt`, read at `latents(denoiser)`: one
    latent per read step, each at that step's timestep (the denoiser is the prompt's, for latents that depend
    on it)."""
    bound = composition.bind(pipe.tokenizer, [prompt_clean(prompt)], config.max_sequence_length)
    denoiser = _prompt_denoiser(pipe, prompt, config)
    guidance = GuidanceConfig(pool=config.pool, layers=list(config.layers) if config.layers else None)
    timesteps = guided_levels(pipe, config)[1]
    maps = [
        denoiser.read_maps(x, torch.tensor(t), bound, guidance)
        for x, t in zip(latents(denoiser), timesteps, strict=True)
    ]
    return torch.cat([_slots(bound, m) for m in maps])


def read_clip(pipe: WanPipeline, clip: Clip, frames, config: ReadingConfig, dual: bool) -> list[torch.Tensor]:
    """Maps `[guide_steps, layers, heads, f, h, w, 6]` of one clip per reading (true prompt, then counterfactual)."""
    latent = encode_clip(pipe, frames)
    sigmas = guided_levels(pipe, config)[0]

    def inverted(denoiser: Denoiser) -> list[torch.Tensor]:  # under the reading's own prompt
        rising = sorted(sigmas)  # inversion climbs; the guided steps descend
        climbed = dict(zip(rising, invert(denoiser, latent, rising, config.substeps), strict=True))
        return [climbed[s] for s in sigmas]

    readings = [(clip.prompt, clip.composition)] + ([clip.counterfactuals[0]] if dual else [])
    return [_map_readings(pipe, prompt, composition, config, inverted) for prompt, composition in readings]


QUALITY = ("std", "kurtosis", "error")  # of a replay's inversion: see `inversion_quality`


def inversion_quality(noise: torch.Tensor, clip: torch.Tensor, returned: torch.Tensor) -> torch.Tensor:
    """`[3]`: the inverted noise's std and excess kurtosis (Gaussian: 1 and 0), and the squared error of the
    clip's latent regenerated from it, relative to the latent's variance."""
    z = noise.double().flatten()
    centred = z - z.mean()
    kurtosis = (centred**4).mean() / (centred**2).mean() ** 2 - 3
    error = ((returned.double() - clip.double()) ** 2).mean() / clip.double().var()
    return torch.stack([z.std(), kurtosis, error]).float()


@torch.no_grad()
def read_replay(
    pipe: WanPipeline, clip: Clip, frames, config: ReadingConfig, dual: bool
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Invert-and-replay readings of one clip: its latent inverted to pure noise under its true prompt
    (`config.replay_substeps` Euler steps), then the sampler's path replayed down from that noise under each
    reading's prompt (true, then counterfactual) and read at the guided steps. Returns the maps
    `[guide_steps, layers, heads, f, h, w, 6]` per reading and the inversion's quality (`inversion_quality`)."""
    latent = encode_clip(pipe, frames)
    substeps = config.replay_substeps
    true_denoiser = _prompt_denoiser(pipe, clip.prompt, config)
    (noise,) = invert(true_denoiser, latent, [1.0], substeps)
    (returned,) = descend(true_denoiser, noise, [1e-6], substeps)  # to (almost) sigma 0: the clip again
    sigmas = guided_levels(pipe, config)[0]

    def replayed(denoiser: Denoiser) -> list[torch.Tensor]:  # under the reading's own prompt
        return descend(denoiser, noise, sigmas, max(1, substeps // config.num_inference_steps))

    readings = [(clip.prompt, clip.composition)] + ([clip.counterfactuals[0]] if dual else [])
    maps = [_map_readings(pipe, prompt, composition, config, replayed) for prompt, composition in readings]
    return maps, inversion_quality(noise, latent, returned)


@dataclass
class Readings:
    """Maps of many clips: `maps [N, readings, steps, layers, heads, f, h, w, 6]` (`SLOTS`), true and
    counterfactual labels.

    `targets [N, 2]`: whether the clip shows its true and its counterfactual label (None: renders, which
    show the true one and not the other); `timesteps [steps]`: where each step was read (None: unknown);
    `quality [N, 3]`: replay readings' inversion quality (`QUALITY`; None for other sources)."""

    maps: torch.Tensor
    true_labels: list[str]
    counterfactual_labels: list[str]
    categories: list[str]
    targets: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    quality: torch.Tensor | None = None

    def inputs(self, channels: str, per_head: bool) -> torch.Tensor:
        """What a head reads of the maps: `[N, readings, steps, layers, heads or 1, f, h, w, slots]`, its kind
        of channel (`SLOTS`), each head apart or their mean."""
        maps = self.maps[..., SLOTS[channels]]
        return maps if per_head else maps.mean(4, keepdim=True)

    def where(self, keep: list[bool]) -> Readings:
        """The readings of the clips marked in `keep`."""
        index = [i for i, k in enumerate(keep) if k]
        return replace(
            self,
            maps=self.maps[index],
            true_labels=[self.true_labels[i] for i in index],
            counterfactual_labels=[self.counterfactual_labels[i] for i in index],
            categories=[self.categories[i] for i in index],
            targets=None if self.targets is None else self.targets[index],
            quality=None if self.quality is None else self.quality[index],
        )

    def well_inverted(self, config: ReadingConfig) -> list[bool]:
        """Per clip: is its replay inversion within `config`'s bounds (every clip, for other sources)?"""
        if self.quality is None:
            return [True] * len(self.true_labels)
        std, kurtosis, error = self.quality.unbind(1)
        good = (
            ((std - 1).abs() <= config.replay_max_std_error)
            & (kurtosis.abs() <= config.replay_max_kurtosis)
            & (error <= config.replay_max_error)
        )
        return good.tolist()

    def novel(self) -> list[bool]:
        """Per clip: does it state one of `grammar.NOVEL_COMPOSITIONS` (its counterfactual then does too)?"""
        return [novel_composition(c, t) for c, t in zip(self.categories, self.true_labels, strict=True)]

    def label_targets(self) -> torch.Tensor:
        """`[N, 2]` float: does the clip show its true label, its counterfactual label."""
        if self.targets is not None:
            return self.targets.float()
        return torch.tensor([[1.0, 0.0]]).expand(len(self.true_labels), 2)


def _clips_described(clips: list[Clip]) -> dict:
    return {"true": [label_of(c.composition) for c in clips], "seeds": [c.seed for c in clips]}


def _readings(parts: list[dict]) -> Readings:
    has_targets = all("targets" in p for p in parts)
    return Readings(
        torch.cat([p["maps"] for p in parts]),
        [x for p in parts for x in p["true"]],
        [x for p in parts for x in p["counterfactual"]],
        [x for p in parts for x in p["categories"]],
        torch.cat([p["targets"] for p in parts]) if has_targets else None,
        parts[0].get("timesteps") if parts else None,
        torch.cat([p["quality"] for p in parts]) if parts and all("quality" in p for p in parts) else None,
    )


def read_clips(
    pipe: WanPipeline,
    clips: Iterable[tuple[Clip, object]],
    config: ReadingConfig,
    work: Path,
    chunk: int = 50,
    report: Callable[[str], None] = print,
) -> Readings:
    """Dual readings (true and counterfactual prompt) of `(clip, frames)` pairs, by inversion or (source
    "replay") invert-and-replay, cached in chunks under `work`."""

    def read(batch):
        part = {
            "counterfactual": [label_of(c.counterfactuals[0][1]) for c, _ in batch],
            "categories": [c.category for c, _ in batch],
        }
        if config.source == "replay":
            replays = [read_replay(pipe, clip, frames, config, dual=True) for clip, frames in batch]
            part["quality"] = torch.stack([quality for _, quality in replays])
            per_clip = [maps for maps, _ in replays]
        else:
            per_clip = [read_clip(pipe, clip, frames, config, dual=True) for clip, frames in batch]
        return {"maps": torch.stack([torch.stack(maps) for maps in per_clip]), **part}

    parts = cached_chunks(clips, work, chunk, lambda batch: _clips_described([c for c, _ in batch]), read, report)
    return _readings(parts)


@torch.no_grad()
def read_trajectory(
    pipe: WanPipeline, clip: Clip, config: ReadingConfig, seed: int, guidance_scale: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readings where guidance acts: the generator samples `clip.prompt` from the noise of `seed` as the
    guided sampler does (unguided), and the latents it passes through at the first `config.guide_steps`
    steps are read under the true and the counterfactual prompt. The CompShapes judge, on the decoded
    clip, says which of the two labels it shows. Returns (maps `[2, steps, layers, heads, f, h, w, 6]`,
    targets `[2]`: true label shown, counterfactual label shown)."""
    scene = clip.scene
    size = {"height": scene.height, "width": scene.width, "num_frames": scene.frames}
    noise = pipe.prepare_latents(
        1,
        pipe.transformer.config.in_channels,
        *size.values(),
        torch.float32,
        pipe._execution_device,
        torch.Generator().manual_seed(seed),
    )
    visited = [noise]

    def keep(i, t, latents):
        if len(visited) < config.guide_steps:
            visited.append(latents.clone())

    out = CVGPipeline(pipe)(
        clip.prompt,
        latents=noise.clone(),
        num_inference_steps=config.num_inference_steps,
        guidance_scale=guidance_scale,
        max_sequence_length=config.max_sequence_length,
        on_step=keep,
        **size,
    )
    frames = to_uint8(out.frames[0])
    cf_prompt, cf_composition = clip.counterfactuals[0]
    targets = torch.tensor([judge(frames, clip.composition).ok, judge(frames, cf_composition).ok])
    readings = [
        _map_readings(pipe, prompt, composition, config, lambda _: visited)
        for prompt, composition in ((clip.prompt, clip.composition), (cf_prompt, cf_composition))
    ]
    return torch.stack(readings), targets


def read_trajectories(
    pipe: WanPipeline,
    clips: Iterable[Clip],
    config: ReadingConfig,
    work: Path,
    chunk: int = 25,
    report: Callable[[str], None] = print,
) -> Readings:
    """`read_trajectory` of each clip (noise seed = the clip's seed), cached in chunks under `work`."""

    def read(batch):
        read = [read_trajectory(pipe, clip, config, clip.seed) for clip in batch]
        return {
            "maps": torch.stack([m for m, _ in read]),
            "targets": torch.stack([t for _, t in read]),
            "timesteps": torch.tensor(guided_levels(pipe, config)[1]),
            "counterfactual": [label_of(c.counterfactuals[0][1]) for c in batch],
            "categories": [c.category for c in batch],
        }

    return _readings(cached_chunks(clips, work, chunk, _clips_described, read, report))


def rendered(clips: Iterable[Clip]) -> Iterable[tuple[Clip, object]]:
    """CompShapes clips with their frames rendered on the fly."""
    for clip in clips:
        yield clip, render(clip.scene)


def dataset_clips(directory: str | Path, shape: tuple[int, int, int]) -> Iterable[tuple[Clip, object]]:
    """The clips of a dataset-format folder (index.jsonl + clips/) with their frames, which must be
    `shape` (frames, height, width): the size the generator makes and its classifier reads."""
    records = read_index(directory)
    if not records:
        raise FileNotFoundError(f"no clips in {directory} (expected index.jsonl and clips/)")
    for record in records:
        frames = read_frames(directory, record)
        if tuple(frames.shape[:3]) != shape:
            raise ValueError(
                f"{directory}: clip {record.get('id')} is {'x'.join(map(str, frames.shape[:3]))}; "
                f"the generator makes {'x'.join(map(str, shape))} videos"
            )
        yield Clip.from_record(record), frames
