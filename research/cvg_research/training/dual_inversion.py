"""Dual-inversion training of the compositional classifier (`cvg train-classifier`).

For every clip with a known composition (CompShapes renders here; any dataset-format folder elsewhere):
  1. encode it with the generator's VAE (posterior mean, normalised as WanPipeline normalises latents);
  2. for each reading prompt, its true prompt and (dual) its counterfactual prompt, invert it along the
     flow under that prompt to the noise levels of the guided steps and read the pooled maps of that
     prompt's entity tokens there (`cvg.guidance.inversion.invert`, `Denoiser.read_maps`);
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cvg.guidance.classifier import ClassifierConfig, CompositionClassifier, LabelEncoder, label_of
from cvg.guidance.composition import Composition
from cvg.io.files import locked, write_text_atomic
from cvg.models.wan import generator_description, load_wan_pipeline, video_size
from cvg_research.compshapes.dataset import split_clip
from cvg_research.compshapes.grammar import Clip, check_sealed, sealed
from cvg_research.compshapes.stats import auroc
from cvg_research.training.config import SOURCES, ReadingConfig, TrainingConfig
from cvg_research.training.readings import (
    Readings,
    dataset_clips,
    guided_levels,
    read_clips,
    read_trajectories,
    rendered,
)

GUIDED_CATEGORIES = ("spatial", "motion", "attribute", "numeracy")
SINGLE_READING = "ablation-single-reading"  # beside the classifier: the one trained without dual inversion
LABEL_TRANSFER = "label-transfer"  # beside it too: trained without the clips of `grammar.NOVEL_COMPOSITIONS`
LOCK = ".lock"  # in the output directory: held by its one trainer


def _inputs(readings: Readings, config: TrainingConfig) -> torch.Tensor:
    """The maps the head reads (`Readings.inputs`), under the true prompt only unless `config.dual`."""
    maps = readings.inputs(config.channels, config.per_head)
    return maps if config.dual else maps[:, :1]


def _examples(readings: Readings, config: TrainingConfig) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """(maps [M, layers, heads, f, h, w, slots], label texts, targets, timesteps [M]): each reading, each step,
    both labels; a label's target is whether the clip shows it."""
    maps = _inputs(readings, config)
    n, r, s = maps.shape[:3]
    flat = maps.flatten(0, 2)  # clip-major, then reading, then step
    clip = torch.arange(n).repeat_interleave(r * s)
    texts = [readings.true_labels[i] for i in clip] + [readings.counterfactual_labels[i] for i in clip]
    shown = readings.label_targets()[clip]
    timesteps = readings.timesteps if readings.timesteps is not None else torch.full((s,), float("nan"))
    steps = timesteps.float().repeat(n * r)
    return torch.cat([flat, flat]), texts, torch.cat([shown[:, 0], shown[:, 1]]), torch.cat([steps, steps])


def _family_examples(
    readings: Readings, config: TrainingConfig
) -> tuple[torch.Tensor, list[list[str]], torch.Tensor, torch.Tensor]:
    """(maps [M, ...], label families, the index of the label shown in its family [M], timesteps [M]): each
    reading and step of a clip that shows exactly one of its two labels, scored against the true label's
    family (`Composition.family`); a label shown outside that family, or a family of one, is left out."""
    maps = _inputs(readings, config)
    n, r, s = maps.shape[:3]
    shown = readings.label_targets()
    timesteps = readings.timesteps if readings.timesteps is not None else torch.full((s,), float("nan"))
    kept, families, targets = [], [], []
    for i, (true, counterfactual) in enumerate(zip(readings.true_labels, readings.counterfactual_labels, strict=True)):
        family = [label_of(c) for c in Composition.parse(true).family()]
        if shown[i, 0] == shown[i, 1] or len(family) < 2:
            continue
        label = family[0] if shown[i, 0] else label_of(Composition.parse(counterfactual).family()[0])
        if label in family:
            kept.append(i)
            families.append(family)
            targets.append(family.index(label))
    index = torch.tensor(kept, dtype=torch.long)
    repeat = r * s
    return (
        maps[index].flatten(0, 2),
        [f for f in families for _ in range(repeat)],
        torch.tensor(targets, dtype=torch.long).repeat_interleave(repeat),
        timesteps.float().repeat(len(kept) * r),
    )


def _binary_loss(maps, texts, targets, config: TrainingConfig, encoder: LabelEncoder):
    """Cross-entropy of each (maps, label) pair against whether the clip shows the label, targets smoothed."""
    embeddings = encoder(texts)
    targets = targets * (1 - config.label_smoothing) + config.label_smoothing / 2

    def loss(model: CompositionClassifier, idx: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(maps[idx], embeddings[idx], at), targets[idx])

    return loss


def _family_loss(maps, families, targets, config: TrainingConfig, encoder: LabelEncoder):
    """Cross-entropy of the label shown among its family (families of different sizes padded and masked),
    the target smoothed over the family's own members."""
    texts = sorted({t for f in families for t in f})
    table, width = encoder(texts), max(len(f) for f in families)
    position = {t: i for i, t in enumerate(texts)}
    index = torch.tensor([[position[t] for t in f] + [0] * (width - len(f)) for f in families])
    member = torch.tensor([[True] * len(f) + [False] * (width - len(f)) for f in families])
    eps = config.label_smoothing
    wanted = member.float() * (eps / member.sum(1, keepdim=True))
    wanted[torch.arange(len(targets)), targets] += 1 - eps

    def loss(model: CompositionClassifier, idx: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
        logits = model.scores(maps[idx], table[index[idx]], at).masked_fill(~member[idx], float("-inf"))
        log_p = logits.log_softmax(-1).masked_fill(~member[idx], 0.0)
        return -(wanted[idx] * log_p).sum(-1).mean()

    return loss


def train_classifier(
    readings: Readings,
    generator: dict,
    config: TrainingConfig = TrainingConfig(),
    encoder: LabelEncoder | None = None,
    report: Callable[[str], None] = print,
) -> CompositionClassifier:
    """A classifier head fit to the readings: binary cross-entropy on both labels of every reading, or
    (`config.objective` "multiclass") cross-entropy of the label shown among its family."""
    encoder = encoder or LabelEncoder()
    if config.objective == "multiclass":
        maps, families, targets, timesteps = _family_examples(readings, config)
        if not families:
            raise ValueError("no reading shows one label of a family of two or more: nothing to train multiclass on")
        texts = sorted({t for f in families for t in f})
        loss_of = _family_loss(maps, families, targets, config, encoder)
        confidence = 1 - config.label_smoothing + config.label_smoothing / max(len(f) for f in families)
    else:
        maps, label_texts, targets, timesteps = _examples(readings, config)
        texts = sorted(set(label_texts))
        loss_of = _binary_loss(maps, label_texts, targets, config, encoder)
        confidence = 1 - config.label_smoothing / 2
    if config.timestep_conditioned and torch.isnan(timesteps).any():
        raise ValueError("these readings do not record their timesteps; train with timestep_conditioned=False")
    timesteps = timesteps if config.timestep_conditioned else None
    torch.manual_seed(config.seed)
    model = CompositionClassifier(
        ClassifierConfig(
            layers=maps.shape[1],
            tiles=tuple(maps.shape[3:6]),
            entities=2,
            heads=maps.shape[2],
            channels=config.channels,
            aggregator=config.aggregator,
            label_dim=encoder.dim,
            hidden_dim=config.hidden_dim,
            generator=generator,
            timestep_conditioned=config.timestep_conditioned,
            confidence=confidence,
            objective=config.objective,
        )
    )
    model.standardise(maps, encoder(texts), timesteps)
    opt = torch.optim.AdamW(model.parameters(), config.lr, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * math.ceil(len(targets) / config.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps)
    for epoch in range(config.epochs):
        total = 0.0
        for idx in torch.randperm(len(targets), generator=order).split(config.batch):
            loss = loss_of(model, idx, None if timesteps is None else timesteps[idx])
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
    maps = readings.inputs(model.config.channels, model.config.heads > 1).flatten(0, 2)
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
    if not readings.true_labels:  # e.g. no held-out clip states a novel composition
        return {"overall": {"accuracy": None, "leakage": None, "clips": 0}}
    logits, shown = reading_logits(model, readings, encoder), readings.label_targets()
    decided = shown[:, 0] != shown[:, 1]
    sign = torch.where(shown[:, :1] > shown[:, 1:], 1.0, -1.0)  # [N, 1]: +1 when the true label is shown
    margin = (logits[..., 0] - logits[..., 1]) * sign.unsqueeze(-1)  # [N, readings, steps]: > 0 when right
    right, leaked = (margin[:, 0] > 0).float().mean(1), (margin[:, -1] < 0).float().mean(1)

    def summary(mask: torch.Tensor) -> dict:
        kept = mask & decided  # None where no clip shows exactly one of its labels
        result = {
            "accuracy": right[kept].mean().item() if kept.any() else None,
            "leakage": leaked[kept].mean().item() if kept.any() else None,
            "clips": int(mask.sum()),
        }
        if readings.targets is not None:
            result["auroc"] = [auroc(logits[mask, 0, step, 0], shown[mask, 0]) for step in range(logits.shape[2])]
        return result

    result = {"overall": summary(torch.ones(len(shown), dtype=torch.bool))}
    for category in sorted(set(readings.categories)):
        result[category] = summary(torch.tensor([c == category for c in readings.categories]))
    return result


def inversion_summary(readings: Readings, config: ReadingConfig) -> dict | None:
    """Replay readings: the inverted noises' mean std and excess kurtosis, the median relative error of the
    clip regenerated from them, and how many clips are kept (None for other sources)."""
    if readings.quality is None:
        return None
    std, kurtosis, error = readings.quality.unbind(1)
    kept = readings.well_inverted(config)
    return {
        "std": std.mean().item(),
        "kurtosis": kurtosis.mean().item(),
        "error_median": error.median().item(),
        "kept": sum(kept),
        "clips": len(kept),
    }


def compshapes_clips(seed: int, stream: int, count: int, split: str, frames: int, size: int) -> list[Clip]:
    """`count` CompShapes clips of the guided categories in turn, from one split ("train", "dev" or "test")."""
    categories, size = GUIDED_CATEGORIES, {"frames": frames, "height": size, "width": size}
    clips = (split_clip(seed * 1000 + stream, i, categories[i % len(categories)], split, **size) for i in range(count))
    return list(sealed(clips, split))


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
    trained without the clips of `grammar.NOVEL_COMPOSITIONS`, measured on the held-out clips of those only),
    and measure them on the held-out clips (`out/training.json`). Readings are cached `chunk` clips a file,
    so a killed run loses at most one chunk; one trainer per `out` at a time (a second is refused)."""

    if reading.source not in SOURCES:
        raise ValueError(f"reading source must be one of {', '.join(SOURCES)}, got {reading.source!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / LOCK, wait=False):  # LockedError, naming the holder's pid, if another trainer runs
        return _train_and_evaluate(
            model, out, clips, heldout, seed, reading, training, report, data, heldout_data, chunk
        )


def _train_and_evaluate(
    model, out: Path, clips, heldout, seed, reading, training, report, data, heldout_data, chunk
) -> dict:
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
    # "-heads": readings of every head and both kinds of channel (`readings.SLOTS`), unlike earlier caches.
    schedule = f"steps{reading.num_inference_steps}-guided{reading.guide_steps}"
    work = out / ".work" / f"{generator['transformer']}-{schedule}-heads"
    if reading.source != "inversion":  # each source its own readings
        work = work.with_name(f"{work.name}-{reading.source}")

    def source(folder, stream: int, count: int, split: str):
        if folder is None:
            return rendered(compshapes_clips(seed, stream, count, split, frames, height))
        clips = itertools.islice(dataset_clips(folder, (frames, height, width)), count)
        return ((check_sealed(clip, split), video) for clip, video in clips)

    def read(folder, stream: int, count: int, split: str) -> Readings:
        where = work / f"readings-{split}"
        if reading.source == "trajectory":  # only the clips' prompts: the generator makes the videos
            if folder is None:
                return read_trajectories(
                    pipe, compshapes_clips(seed, stream, count, split, frames, height), reading, where, chunk, report
                )
            return read_trajectories(
                pipe, (c for c, _ in source(folder, stream, count, split)), reading, where, chunk, report
            )
        readings = read_clips(pipe, source(folder, stream, count, split), reading, where, chunk, report)
        return replace(readings, timesteps=torch.tensor(guided_levels(pipe, reading)[1]))

    train_set, held_set = read(data, 10, clips, "train"), read(heldout_data, 11, heldout, "dev")
    read_seconds = time.perf_counter() - started
    inversions = {"train": inversion_summary(train_set, reading), "heldout": inversion_summary(held_set, reading)}
    train_set, held_set = (r.where(r.well_inverted(reading)) for r in (train_set, held_set))
    encoder = LabelEncoder()
    heads = {  # name: (dual, training readings, held-out readings, where it is saved)
        "dual": (True, train_set, held_set, out),
        "single": (False, train_set, held_set, out / SINGLE_READING),
        "transfer": (
            True,
            train_set.where([not n for n in train_set.novel()]),
            held_set.where(held_set.novel()),
            out / LABEL_TRANSFER,
        ),
    }
    results = {}
    for name, (dual, trained_on, measured_on, directory) in heads.items():
        config = replace(training, dual=dual)
        classifier = train_classifier(trained_on, generator, config, encoder, report)
        classifier.save_pretrained(directory)
        results[name] = evaluate_readings(classifier, measured_on, encoder)
    summary = {
        "model": str(model),
        "clips": len(train_set.true_labels),
        "heldout": len(held_set.true_labels),
        "data": str(data or "compshapes"),
        "heldout_data": str(heldout_data or "compshapes"),
        "seed": seed,
        "reading": reading.__dict__,
        "training": training.__dict__,
        "read_seconds": read_seconds,
        "inversions": inversions,
        "total_seconds": time.perf_counter() - started,
        "heldout_results": results,
    }
    write_text_atomic(out / "training.json", json.dumps(summary, indent=1, default=list))
    return summary
