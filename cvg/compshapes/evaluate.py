"""Judging a set of videos against their compositions: per-category accuracy with 95% intervals.

The set is a directory in the dataset format (`index.jsonl` + frame files: `.npz` with `frames`, or any
video imageio reads, e.g. `.mp4`); records without a category count under their composition's kind.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Collection
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from cvg.compshapes.dataset import INDEX, read_index
from cvg.compshapes.grammar import CATEGORIES, sample_clip
from cvg.compshapes.judge import detect, judge_detections
from cvg.compshapes.world import render
from cvg.guidance.composition import Composition

REFERENCE_SEED = 987_654_321  # fresh renders to compare against when no reference set is given


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0 and 1)."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def auroc(scores, labels) -> float | None:
    """Area under the ROC curve of `scores` for binary `labels` (ties count half); None without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return None
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


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
    tallies: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # holds, total, rejected, counterfactuals
    from cvg.compshapes.quality import artefact_counts, clip_features, load_encoder

    encoder = load_encoder() if quality else None
    failures, features, counts = [], [], np.zeros(4)
    for record in records:
        path = directory / record["file"]
        if not path.resolve().is_relative_to(directory.resolve()):  # an index names clips, never other files
            raise ValueError(f"clip {record['file']!r} listed in the index lies outside {directory}")
        if not path.is_file():
            raise FileNotFoundError(f"clip {record['file']!r} listed in the index is missing from {directory}")
        frames = load_frames(path)
        detections, size = [detect(f) for f in frames], frames.shape[1:3]
        if quality:  # per clip, so no clip set is held in memory
            features.append(clip_features(encoder, [frames]))
            counts += artefact_counts(frames, detections)
        composition = Composition.from_dict(record["composition"])
        category = record.get("category", composition.kind)
        verdict = judge_detections(detections, size, composition)
        tally = tallies[category]
        tally[0] += verdict.ok
        tally[1] += 1
        if not verdict.ok:
            failures.append({"file": record["file"], "prompt": record.get("prompt"), "reason": verdict.reason})
        for counter in record.get("counterfactuals", []):
            tally[2] += not judge_detections(detections, size, Composition.from_dict(counter["composition"])).ok
            tally[3] += 1
    report = {"categories": {}, "failures": failures}
    for category, (holds, total, rejected, counterfactuals) in sorted(tallies.items()):
        low, high = wilson_interval(holds, total)
        entry = {"accuracy": holds / total, "ci95": [low, high], "clips": total}
        if counterfactuals:
            entry["counterfactual_rejection"] = rejected / counterfactuals
        report["categories"][category] = entry
    if quality:
        report["quality"] = quality_scores(np.concatenate(features), counts, frames.shape, encoder, reference)
    return report


def quality_scores(
    features: np.ndarray, counts: np.ndarray, shape: tuple, encoder, reference: str | os.PathLike | None = None
) -> dict[str, float]:
    """Fréchet distance of the judged clips' encoder `features` to reference renders, and artefact rates."""
    from cvg.compshapes.quality import artefact_rates, clip_features, frechet_distance

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
