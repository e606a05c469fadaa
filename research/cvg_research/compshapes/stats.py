"""Statistics for judged clip sets: intervals and paired tests that respect how the clips were drawn.

Clips that share a prompt are not independent draws (the same words, often the same difficulty), so the
intervals and tests here resample or permute whole clusters (the clips of one prompt), never single clips:
a cluster bootstrap for intervals and a sign-flip permutation test for paired comparisons (two rows on
the same clips: same prompts, same noise). With one clip per prompt they reduce to the usual ones.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from scipy.stats import rankdata

RESAMPLES = 10_000  # bootstrap resamples and permutations: the 95% bounds and p move in the third decimal


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


def _cluster_sums(values: np.ndarray, clusters: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: the sum of `values` ([n] or [n, k]) and the number of clips."""
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    _, index = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    sums = np.zeros((index.max() + 1, *values.shape[1:]))
    np.add.at(sums, index, values)
    return sums, np.bincount(index).astype(np.float64)


def cluster_bootstrap_interval(
    values: Sequence[float], clusters: Sequence[Hashable], seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (e.g. 0/1 verdicts, or paired differences) when whole
    clusters are drawn with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return 0.0, 1.0
    sums, sizes = _cluster_sums(values, clusters)
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(RESAMPLES, len(sums)))
    means = sums[draws].sum(1) / sizes[draws].sum(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def sign_flip_test(a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable], seed: int = 0) -> float:
    """Two-sided p of "b and a score alike" for paired scores: each cluster's summed difference b - a has its
    sign flipped at random (exact over all flips when there are at most 12 clusters)."""
    difference = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    sums, _ = _cluster_sums(difference, clusters)
    sums = sums[sums != 0]  # clusters with no difference flip to themselves
    if len(sums) == 0:
        return 1.0
    observed = abs(sums.sum())
    if len(sums) <= 12:
        signs = 1 - 2 * ((np.arange(2 ** len(sums))[:, None] >> np.arange(len(sums))) & 1)
        return float(np.mean(np.abs(signs @ sums) >= observed - 1e-9))
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(RESAMPLES, len(sums)))
    return float((np.sum(np.abs(signs @ sums) >= observed - 1e-9) + 1) / (RESAMPLES + 1))
