"""Clustered statistics: intervals and paired tests that widen when clips share a prompt."""

import numpy as np
import pytest

from cvg_research.compshapes.stats import cluster_bootstrap_interval, sign_flip_test, wilson_interval


def test_one_clip_per_prompt_matches_the_independent_interval():
    right = [1] * 60 + [0] * 40
    low, high = cluster_bootstrap_interval(right, list(range(100)))
    wilson = wilson_interval(60, 100)
    assert abs(low - wilson[0]) < 0.02 and abs(high - wilson[1]) < 0.02


def test_clips_sharing_a_prompt_widen_the_interval():
    # 100 clips, 10 prompts whose clips all agree: 10 independent draws, not 100.
    right = [1] * 60 + [0] * 40
    low, high = cluster_bootstrap_interval(right, [i // 10 for i in range(100)])
    wilson = wilson_interval(60, 100)
    assert high - low > 1.8 * (wilson[1] - wilson[0])
    assert cluster_bootstrap_interval(right, [i // 10 for i in range(100)]) == (low, high)  # seeded


def test_sign_flips_are_exact_for_few_clusters_and_sampled_for_many():
    assert sign_flip_test([0, 0, 0], [1, 1, 1], ["a", "b", "c"]) == pytest.approx(2 / 8)
    assert sign_flip_test([0, 0, 0], [1, 1, 1], ["a", "a", "a"]) == 1.0  # one cluster: no evidence
    assert sign_flip_test([1, 0], [1, 0], ["a", "b"]) == 1.0  # no difference at all
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.3
    b = a | (rng.random(400) < 0.2)  # b gains on about 56 clips and loses none
    assert sign_flip_test(a, b, list(range(400))) < 1e-3
    assert sign_flip_test(a, a[::-1], list(range(400))) > 0.05


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="3 values but 2 cluster labels"):
        cluster_bootstrap_interval([1, 0, 1], ["a", "b"])
