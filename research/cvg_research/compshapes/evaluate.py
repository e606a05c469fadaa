"""Judging a set of videos against their compositions: per-category accuracy with 95% intervals clustered by
prompt, how often the entities were drawn at all and how often, drawn, they were composed right.

The set is a directory in the dataset format (`index.jsonl` + frame files: `.npz` with `frames`, or any
video imageio reads, e.g. `.mp4`); records without a category count under their composition's kind.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path

import numpy as np

from cvg.guidance.composition import Composition
from cvg_research.compshapes.dataset import INDEX, read_index, required
from cvg_research.compshapes.grammar import CATEGORIES, sample_clip
from cvg_research.compshapes.judge import DRAWING, detect, judge_detections
from cvg_research.compshapes.stats import cluster_bootstrap_interval, wilson_interval
from cvg_research.compshapes.world import render

REFERENCE_SEED = 987_654_321  # fresh renders to compare against when no reference set is given


def load_frames(path: Path) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as data:
            return data["frames"]
    import imageio.v2 as imageio

    return np.stack(imageio.mimread(path, memtest=False))[..., :3]


def evaluate(
    directory: str | os.PathLike,
    index: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    quality: bool = True,
    limit: int | None = None,
    ids: Collection[int] | None = None,
) -> dict:
    """Accuracy per category (and counterfactual rejection where records carry counterfactuals) over the
    first `limit` clips (all by default), of those only the clips with `ids` if given; with `quality`, the
    Fréchet distance to reference renders (a dataset directory, or as many fresh renders as clips, at most
    500) and artefact rates."""
    directory = Path(directory)
    records = [r for r in read_index(index or directory)[:limit] if ids is None or r.get("id") in ids]
    if not records:
        raise FileNotFoundError(f"no clips listed in {index or directory / INDEX}")
    tallies: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # rejected, counterfactuals
    from cvg_research.compshapes.quality import artefact_counts, clip_features, load_encoder

    encoder = load_encoder() if quality else None
    verdicts, features, counts = [], [], np.zeros(4)
    for record in records:
        required(record, index or directory / INDEX, "file", "composition")
        path = directory / record["file"]
        if not path.resolve().is_relative_to(directory.resolve()):  # an index names clips, never other files
            raise ValueError(f"clip {record['file']!r} listed in the index lies outside {directory}")
        if not path.is_file():
            raise FileNotFoundError(f"clip {record['file']!r} listed in the index is missing from {directory}")
        frames = load_frames(path)
        if len(frames) == 0:
            raise ValueError(f"clip {record['file']!r} in {directory} has no frames")
        detections, size = [detect(f) for f in frames], frames.shape[1:3]
        if quality:  # per clip, so no clip set is held in memory
            features.append(clip_features(encoder, [frames]))
            counts += artefact_counts(frames, detections)
        composition = Composition.from_dict(record["composition"])
        category = record.get("category", composition.kind)
        verdict = judge_detections(detections, size, composition)
        verdicts.append(
            {
                "file": record["file"],
                "prompt": record.get("prompt", record["file"]),  # no prompt: each clip its own cluster
                "category": category,
                "ok": verdict.ok,
                "failure": verdict.failure,
                "reason": verdict.reason,
            }
        )
        for counter in record.get("counterfactuals", []):
            tallies[category][0] += not judge_detections(
                detections, size, Composition.from_dict(counter["composition"])
            ).ok
            tallies[category][1] += 1
    report = {
        "categories": {
            c: summarise([v for v in verdicts if v["category"] == c]) for c in sorted({v["category"] for v in verdicts})
        },
        "all": summarise(verdicts),
        "verdicts": verdicts,
        "failures": [v for v in verdicts if not v["ok"]],
    }
    for category, (rejected, counterfactuals) in tallies.items():
        if counterfactuals:
            report["categories"][category]["counterfactual_rejection"] = rejected / counterfactuals
    if quality:
        report["quality"] = quality_scores(np.concatenate(features), counts, frames.shape, encoder, reference)
    return report


def summarise(verdicts: list[dict]) -> dict:
    """Accuracy of judged clips with a 95% interval clustered by prompt (and Wilson's, which treats clips as
    independent), how many were drawn (no entity missing) and how many of those were composed right."""
    right = [v["ok"] for v in verdicts]
    drawn = [v["failure"] != DRAWING for v in verdicts]
    prompts = [v["prompt"] for v in verdicts]
    return {
        "accuracy": float(np.mean(right)),
        "ci95": list(cluster_bootstrap_interval(right, prompts)),
        "wilson95": list(wilson_interval(sum(right), len(right))),
        "clips": len(verdicts),
        "prompts": len(set(prompts)),
        "drawn": float(np.mean(drawn)),
        "composed_when_drawn": sum(right) / sum(drawn) if any(drawn) else None,
    }


def quality_scores(
    features: np.ndarray, counts: np.ndarray, shape: tuple, encoder, reference: str | os.PathLike | None = None
) -> dict[str, float]:
    """Fréchet distance of the judged clips' encoder `features` to reference renders, and artefact rates."""
    from cvg_research.compshapes.quality import artefact_rates, clip_features, frechet_distance

    if reference is not None:
        clips = (load_frames(Path(reference) / r["file"]) for r in read_index(reference))
    else:
        count = min(len(features), 500)
        clips = (render(sample_clip(REFERENCE_SEED + i, CATEGORIES[i % 4], *shape[:3]).scene) for i in range(count))
    references = [clip_features(encoder, [clip]) for clip in clips]
    if len(features) < 2 or len(references) < 2:
        raise ValueError("the Fréchet distance needs at least 2 clips on each side")
    distance = frechet_distance(np.concatenate(references), features)
    return {"frechet_distance": distance, "reference_clips": len(references), **artefact_rates(counts)}
