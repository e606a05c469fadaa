"""Dual-inversion training of the compositional classifier (`cvg train-classifier`).

For every clip with a known composition (CompShapes renders here; any dataset-format folder elsewhere):
  1. encode it with the generator's VAE (posterior mean, normalised as WanPipeline normalises latents);
  2. for each reading prompt, its true prompt and (dual) its counterfactual prompt, invert it along the
     flow under that prompt to the noise levels of the guided steps and read the pooled maps of that
     prompt's entity tokens there (`cvg.inversion.invert`, `Denoiser.read_maps`);
  3. every reading gives a positive (maps, the clip's true label) and a negative (maps, the
     counterfactual label). Read under the counterfactual prompt, the right answer is still the clip's
     own label, so the classifier cannot succeed by reading the prompt back out of the maps.
Leakage, measured on held-out clips read under the counterfactual prompt: how often the classifier
prefers the prompt's label to the clip's own. Readings are cached in chunks under WORK, so an
interrupted run resumes; training the head on them takes seconds.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from cvg.classifier import ClassifierConfig, CompositionClassifier, LabelEncoder, label_of
from cvg.compshapes.dataset import read_frames, read_index, split_clip
from cvg.compshapes.evaluate import auroc
from cvg.compshapes.grammar import Clip, seen_wording, transfer_wording
from cvg.compshapes.judge import judge
from cvg.compshapes.world import render
from cvg.files import atomic_path, locked, remove_stale_temporaries, write_text_atomic
from cvg.generator import to_pixels
from cvg.inversion import invert
from cvg.pipeline import CVGPipeline, generator_description, latent_normalisation, load_wan_pipeline, video_size
from cvg.sampler import Denoiser, GuidanceConfig
from cvg.video import to_uint8

GUIDED_CATEGORIES = ("spatial", "motion", "attribute", "numeracy")
SINGLE_READING = "ablation-single-reading"  # beside the classifier: the one trained without dual inversion
LABEL_TRANSFER = "label-transfer"  # beside it too: trained on labels without the held-out transfer wordings
LOCK = ".lock"  # in the output directory: held by its one trainer


@dataclass(frozen=True)
class ReadingConfig:
    """Where the classifier reads: the guided steps of a sampling schedule, and how maps are recorded.

    source "trajectory": the generator's own samples from Gaussian noise, read at the latents the sampler
    passes through and labelled by the judge on the decoded clip (`read_trajectory`); "inversion": clips
    inverted to the guided steps' noise levels (`read_clip`)."""

    source: str = "trajectory"
    num_inference_steps: int = 20
    guide_steps: int = 4  # the first steps read: guidance may act on any of them
    substeps: int = 4  # Euler steps of the inversion per noise interval
    pool: tuple[int, int, int] = (1, 2, 2)
    layers: tuple[int, ...] | None = None  # None: every block
    max_sequence_length: int = 512


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


def _entity_readings(pipe: WanPipeline, prompt: str, composition, config: ReadingConfig,
                     latents: Callable[[Denoiser], list[torch.Tensor]]) -> torch.Tensor:  # fmt: skip
    """Entity maps `[steps, layers, f, h, w, E]` under `prompt`, read at `latents(denoiser)`: one latent per
    read step, each at that step's timestep (the denoiser is the prompt's, for latents that depend on it)."""
    embeds = pipe.encode_prompt(prompt, do_classifier_free_guidance=False,
                                max_sequence_length=config.max_sequence_length)[0]  # fmt: skip
    bound = composition.bind(pipe.tokenizer, [prompt_clean(prompt)], config.max_sequence_length)
    denoiser = Denoiser(pipe.transformer, embeds, None, 1.0)
    guidance = GuidanceConfig(pool=config.pool, layers=list(config.layers) if config.layers else None)
    timesteps = guided_levels(pipe, config)[1]
    maps = [denoiser.read_maps(x, torch.tensor(t), bound, guidance)
            for x, t in zip(latents(denoiser), timesteps, strict=True)]  # fmt: skip
    return torch.cat([bound.entity_maps(m) for m in maps])


def read_clip(pipe: WanPipeline, clip: Clip, frames, config: ReadingConfig, dual: bool) -> list[torch.Tensor]:
    """Entity maps `[guide_steps, layers, f, h, w, E]` of one clip per reading (true prompt, then counterfactual)."""
    latent = encode_clip(pipe, frames)
    sigmas = guided_levels(pipe, config)[0]

    def inverted(denoiser: Denoiser) -> list[torch.Tensor]:  # under the reading's own prompt
        rising = sorted(sigmas)  # inversion climbs; the guided steps descend
        climbed = dict(zip(rising, invert(denoiser, latent, rising, config.substeps), strict=True))
        return [climbed[s] for s in sigmas]

    readings = [(clip.prompt, clip.composition)] + ([clip.counterfactuals[0]] if dual else [])
    return [_entity_readings(pipe, prompt, composition, config, inverted) for prompt, composition in readings]


@dataclass
class Readings:
    """Maps of many clips: `maps [N, readings, steps, layers, f, h, w, 2]`, true and counterfactual labels.

    `targets [N, 2]`: whether the clip shows its true and its counterfactual label (None: renders, which
    show the true one and not the other); `timesteps [steps]`: where each step was read (None: unknown)."""

    maps: torch.Tensor
    true_labels: list[str]
    counterfactual_labels: list[str]
    categories: list[str]
    targets: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None

    def reworded(self, wording: Callable[[str], str]) -> Readings:
        """The same readings with every label rewritten by `wording`."""
        return replace(self, true_labels=[wording(t) for t in self.true_labels],
                       counterfactual_labels=[wording(t) for t in self.counterfactual_labels])  # fmt: skip

    def label_targets(self) -> torch.Tensor:
        """`[N, 2]` float: does the clip show its true label, its counterfactual label."""
        if self.targets is not None:
            return self.targets.float()
        return torch.tensor([[1.0, 0.0]]).expand(len(self.true_labels), 2)


def _cached_chunks(
    items: Iterable, work: Path, chunk: int, describe: Callable[[list], dict], read: Callable[[list], dict],
    report: Callable[[str], None],
) -> list[dict]:  # fmt: skip
    """`read(batch)` of each `chunk` items, cached as WORK/000000.pt...; a cached chunk is reused only when
    `describe(batch)` (which clips it holds) matches what it recorded."""
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work, "*.pt")  # a killed trainer's; callers hold the output's lock
    parts, batch, index = [], [], 0
    start = time.perf_counter()

    def flush():
        path, which = work / f"{index:06d}.pt", describe(batch)
        record = torch.load(path, weights_only=True) if path.is_file() else None
        if record is None or any(record.get(k, v) != v for k, v in which.items()):  # other clips' chunk
            record = {**read(batch), **which}
            with atomic_path(path) as tmp:
                torch.save(record, tmp)
            report(f"read {index + len(batch)} clips ({time.perf_counter() - start:.0f} s)")
        parts.append(record)

    for item in items:
        batch.append(item)
        if len(batch) == chunk:
            flush()
            index, batch = index + chunk, []
    if batch:
        flush()
    return parts


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
    )


def _two_slots(maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.pad(m, (0, 2 - m.shape[-1])) for m in maps])


def read_clips(
    pipe: WanPipeline,
    clips: Iterable[tuple[Clip, object]],
    config: ReadingConfig,
    work: Path,
    chunk: int = 50,
    report: Callable[[str], None] = print,
) -> Readings:
    """Dual readings (true and counterfactual prompt) of `(clip, frames)` pairs, cached in chunks under `work`."""

    def read(batch):
        maps = _two_slots([torch.stack(read_clip(pipe, clip, frames, config, dual=True)) for clip, frames in batch])
        return {"maps": maps, "counterfactual": [label_of(c.counterfactuals[0][1]) for c, _ in batch],
                "categories": [c.category for c, _ in batch]}  # fmt: skip

    parts = _cached_chunks(clips, work, chunk, lambda batch: _clips_described([c for c, _ in batch]), read, report)
    return _readings(parts)


@torch.no_grad()
def read_trajectory(
    pipe: WanPipeline, clip: Clip, config: ReadingConfig, seed: int, guidance_scale: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Readings where guidance acts: the generator samples `clip.prompt` from the noise of `seed` as the
    guided sampler does (unguided), and the latents it passes through at the first `config.guide_steps`
    steps are read under the true and the counterfactual prompt. The CompShapes judge, on the decoded
    clip, says which of the two labels it shows. Returns (maps `[2, steps, layers, f, h, w, 2]`,
    targets `[2]`: true label shown, counterfactual label shown)."""
    scene = clip.scene
    size = {"height": scene.height, "width": scene.width, "num_frames": scene.frames}
    noise = pipe.prepare_latents(1, pipe.transformer.config.in_channels, *size.values(), torch.float32,
                                 pipe._execution_device, torch.Generator().manual_seed(seed))  # fmt: skip
    visited = [noise]

    def keep(i, t, latents):
        if len(visited) < config.guide_steps:
            visited.append(latents.clone())

    out = CVGPipeline(pipe)(clip.prompt, latents=noise.clone(), num_inference_steps=config.num_inference_steps,
                            guidance_scale=guidance_scale, max_sequence_length=config.max_sequence_length,
                            on_step=keep, **size)  # fmt: skip
    frames = to_uint8(out.frames[0])
    cf_prompt, cf_composition = clip.counterfactuals[0]
    targets = torch.tensor([judge(frames, clip.composition).ok, judge(frames, cf_composition).ok])
    readings = [_entity_readings(pipe, prompt, composition, config, lambda _: visited)
                for prompt, composition in ((clip.prompt, clip.composition), (cf_prompt, cf_composition))]  # fmt: skip
    return _two_slots(readings), targets


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
        return {"maps": torch.stack([m for m, _ in read]), "targets": torch.stack([t for _, t in read]),
                "timesteps": torch.tensor(guided_levels(pipe, config)[1]),
                "counterfactual": [label_of(c.counterfactuals[0][1]) for c in batch],
                "categories": [c.category for c in batch]}  # fmt: skip

    return _readings(_cached_chunks(clips, work, chunk, _clips_described, read, report))


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
            raise ValueError(f"{directory}: clip {record.get('id')} is {'x'.join(map(str, frames.shape[:3]))}; "
                             f"the generator makes {'x'.join(map(str, shape))} videos")  # fmt: skip
        yield Clip.from_record(record), frames


@dataclass(frozen=True)
class TrainingConfig:
    # A few hundred judged trajectories overfit a wide head (training AUROC 1.0, held-out near chance):
    # small, strongly decayed and briefly trained (docs/classifier.md). The inversion recipe was 30 epochs,
    # 256 wide, weight decay 1e-4.
    dual: bool = True  # False: only readings under the true prompt (the ablation)
    epochs: int = 5
    batch: int = 256
    lr: float = 1e-3
    hidden_dim: int = 32
    label_smoothing: float = 0.1  # targets eps/2 and 1 - eps/2: a confident head keeps a gradient to guide with
    weight_decay: float = 0.3
    timestep_conditioned: bool = True  # the head sees the noise level it reads at (it guides at several)
    seed: int = 0


def _examples(readings: Readings, dual: bool) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """(maps [M, layers, f, h, w, 2], label texts, targets, timesteps [M]): each reading, each step, both
    labels; a label's target is whether the clip shows it."""
    maps = readings.maps if dual else readings.maps[:, :1]
    n, r, s = maps.shape[:3]
    flat = maps.flatten(0, 2)  # clip-major, then reading, then step
    clip = torch.arange(n).repeat_interleave(r * s)
    texts = [readings.true_labels[i] for i in clip] + [readings.counterfactual_labels[i] for i in clip]
    shown = readings.label_targets()[clip]
    timesteps = readings.timesteps if readings.timesteps is not None else torch.full((s,), float("nan"))
    steps = timesteps.float().repeat(n * r)
    return torch.cat([flat, flat]), texts, torch.cat([shown[:, 0], shown[:, 1]]), torch.cat([steps, steps])


def train_classifier(
    readings: Readings,
    generator: dict,
    config: TrainingConfig = TrainingConfig(),
    encoder: LabelEncoder | None = None,
    report: Callable[[str], None] = print,
) -> CompositionClassifier:
    """A classifier head fit to the readings (binary cross-entropy on both labels of every reading)."""
    encoder = encoder or LabelEncoder()
    maps, texts, targets, timesteps = _examples(readings, config.dual)
    if config.timestep_conditioned and torch.isnan(timesteps).any():
        raise ValueError("these readings do not record their timesteps; train with timestep_conditioned=False")
    timesteps = timesteps if config.timestep_conditioned else None
    embeddings = encoder(texts)
    torch.manual_seed(config.seed)
    model = CompositionClassifier(ClassifierConfig(
        layers=maps.shape[1], tiles=tuple(maps.shape[2:5]), entities=2, label_dim=encoder.dim,
        hidden_dim=config.hidden_dim, generator=generator, timestep_conditioned=config.timestep_conditioned,
        confidence=1 - config.label_smoothing / 2,
    ))  # fmt: skip
    model.standardise(maps, encoder(sorted(set(texts))), timesteps)
    targets = targets * (1 - config.label_smoothing) + config.label_smoothing / 2
    opt = torch.optim.AdamW(model.parameters(), config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * math.ceil(len(targets) / config.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
    for epoch in range(config.epochs):
        total = 0.0
        for idx in torch.randperm(len(targets), generator=order).split(config.batch):
            at = None if timesteps is None else timesteps[idx]
            loss = F.binary_cross_entropy_with_logits(model(maps[idx], embeddings[idx], at), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == config.epochs:
            report(f"classifier epoch {epoch + 1}/{config.epochs} loss {total / len(targets):.4f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def reading_logits(model: CompositionClassifier, readings: Readings, encoder: LabelEncoder) -> torch.Tensor:
    """`[N, readings, steps, 2]` logits of the true and the counterfactual label at every reading."""
    n, r, s = readings.maps.shape[:3]
    maps = readings.maps.flatten(0, 2)
    timesteps = None
    if model.config.timestep_conditioned:
        timesteps = readings.timesteps.float().repeat(n * r)
    logits = []
    for labels in (readings.true_labels, readings.counterfactual_labels):
        embeddings = encoder(labels).repeat_interleave(r * s, 0)
        logits.append(model(maps, embeddings, timesteps).view(n, r, s))
    return torch.stack(logits, dim=-1)


def evaluate_readings(model: CompositionClassifier, readings: Readings, encoder: LabelEncoder) -> dict:
    """Over clips that show exactly one of their two labels (renders: always the true one): accuracy (read
    under the true prompt, the label shown scores above the other) and leakage (read under the
    counterfactual prompt, the label not shown scores above the one shown: for renders, the prompt's label
    wins). With judged targets (trajectory readings) also `auroc`: per step, how well the true label's
    logit under the true prompt ranks clips that show it above clips that do not. Per category and overall."""
    logits, shown = reading_logits(model, readings, encoder), readings.label_targets()
    decided = shown[:, 0] != shown[:, 1]
    sign = torch.where(shown[:, :1] > shown[:, 1:], 1.0, -1.0)  # [N, 1]: +1 when the true label is shown
    margin = (logits[..., 0] - logits[..., 1]) * sign.unsqueeze(-1)  # [N, readings, steps]: > 0 when right
    right, leaked = (margin[:, 0] > 0).float().mean(1), (margin[:, -1] < 0).float().mean(1)

    def summary(mask: torch.Tensor) -> dict:
        kept = mask & decided  # None where no clip shows exactly one of its labels
        result = {"accuracy": right[kept].mean().item() if kept.any() else None,
                  "leakage": leaked[kept].mean().item() if kept.any() else None, "clips": int(mask.sum())}  # fmt: skip
        if readings.targets is not None:
            result["auroc"] = [auroc(logits[mask, 0, step, 0], shown[mask, 0]) for step in range(logits.shape[2])]
        return result

    result = {"overall": summary(torch.ones(len(shown), dtype=torch.bool))}
    for category in sorted(set(readings.categories)):
        result[category] = summary(torch.tensor([c == category for c in readings.categories]))
    return result


def compshapes_clips(seed: int, stream: int, count: int, split: str, frames: int, size: int) -> list[Clip]:
    """`count` CompShapes clips of the guided categories in turn, from one split ("train" or "heldout")."""
    categories = GUIDED_CATEGORIES
    return [split_clip(seed * 1000 + stream, i, categories[i % len(categories)], split, frames=frames, height=size,
                       width=size) for i in range(count)]  # fmt: skip


def train_and_evaluate(
    model: str | Path,
    out: str | Path,
    clips: int = 2000,
    heldout: int = 200,
    seed: int = 0,
    reading: ReadingConfig = ReadingConfig(),
    training: TrainingConfig = TrainingConfig(),
    report: Callable[[str], None] = print,
    data: str | Path | None = None,
    heldout_data: str | Path | None = None,
    chunk: int = 25,
) -> dict:
    """Read training and held-out clips with `model` (CompShapes renders, or the dataset-format folders
    `data` / `heldout_data`), train the dual-inversion classifier (saved to `out`), the single-reading
    ablation (`out/ablation-single-reading`) and the label-transfer classifier (`out/label-transfer`: dual,
    trained without the transfer wordings, measured with labels phrased only in them), and measure them on
    the held-out clips (`out/training.json`). Readings are cached `chunk` clips a file, so a killed run
    loses at most one chunk; one trainer per `out` at a time (a second is refused)."""

    if reading.source not in ("trajectory", "inversion"):
        raise ValueError(f"reading source must be trajectory or inversion, got {reading.source!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / LOCK, wait=False):  # LockedError, naming the holder's pid, if another trainer runs
        return _train_and_evaluate(model, out, clips, heldout, seed, reading, training, report, data, heldout_data,
                                   chunk)  # fmt: skip


def _train_and_evaluate(model, out: Path, clips, heldout, seed, reading, training, report, data, heldout_data,
                        chunk) -> dict:  # fmt: skip
    started = time.perf_counter()
    pipe = load_wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    size = video_size(model)
    frames, height, width = size["num_frames"], size["height"], size["width"]
    if (data is None or heldout_data is None) and height != width:
        raise ValueError(f"CompShapes clips are square; {model} makes {height}x{width} videos (pass --data folders)")
    layers = list(reading.layers) if reading.layers else None
    generator = generator_description(pipe.transformer, layers, reading.pool)
    # Readings depend on the generator and where it is read: another one must never reuse them.
    work = out / ".work" / f"{generator['transformer']}-steps{reading.num_inference_steps}-guided{reading.guide_steps}"
    work = work.with_name(f"{work.name}-trajectory") if reading.source == "trajectory" else work

    def source(folder, stream: int, count: int, split: str):
        if folder is None:
            return rendered(compshapes_clips(seed, stream, count, split, frames, height))
        return itertools.islice(dataset_clips(folder, (frames, height, width)), count)

    def read(folder, stream: int, count: int, split: str) -> Readings:
        where = work / f"readings-{split}"
        if reading.source == "trajectory":  # only the clips' prompts: the generator makes the videos
            if folder is None:
                return read_trajectories(pipe, compshapes_clips(seed, stream, count, split, frames, height), reading,
                                         where, chunk, report)  # fmt: skip
            return read_trajectories(pipe, (c for c, _ in source(folder, stream, count, split)), reading, where,
                                     chunk, report)  # fmt: skip
        readings = read_clips(pipe, source(folder, stream, count, split), reading, where, chunk, report)
        return replace(readings, timesteps=torch.tensor(guided_levels(pipe, reading)[1]))

    train_set, held_set = read(data, 10, clips, "train"), read(heldout_data, 11, heldout, "heldout")
    read_seconds = time.perf_counter() - started
    encoder = LabelEncoder()
    heads = {  # name: (dual, training readings, held-out readings, where it is saved)
        "dual": (True, train_set, held_set, out),
        "single": (False, train_set, held_set, out / SINGLE_READING),
        "transfer": (True, train_set.reworded(seen_wording), held_set.reworded(transfer_wording), out / LABEL_TRANSFER),
    }
    results = {}
    for name, (dual, trained_on, measured_on, directory) in heads.items():
        config = replace(training, dual=dual)
        classifier = train_classifier(trained_on, generator, config, encoder, report)
        classifier.save_pretrained(directory)
        results[name] = evaluate_readings(classifier, measured_on, encoder)
    summary = {"model": str(model), "clips": len(train_set.true_labels), "heldout": len(held_set.true_labels),
               "data": str(data or "compshapes"), "heldout_data": str(heldout_data or "compshapes"), "seed": seed,
               "reading": reading.__dict__, "training": training.__dict__, "read_seconds": read_seconds,
               "total_seconds": time.perf_counter() - started, "heldout_results": results}  # fmt: skip
    write_text_atomic(out / "training.json", json.dumps(summary, indent=1, default=list))
    return summary
