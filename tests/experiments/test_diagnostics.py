"""The two fast diagnostics of a guidance head (cvg_research.experiments.diagnostics) and the AUROC they rest on."""

import math

import numpy as np
import pytest
import torch

from cvg.guidance.classifier import ClassifierConfig, ClassifierObjective, CompositionClassifier
from cvg.guidance.config import GuidanceConfig
from cvg.pipeline import CVGPipeline
from cvg_research.compshapes.dataset import read_index, write_dataset
from cvg_research.compshapes.stats import auroc
from cvg_research.compshapes.videoset import generate_set
from cvg_research.experiments import diagnostics


def test_auroc_counts_ranked_pairs_and_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1.0, 1.0], [0, 1]) == 0.5
    assert auroc([0.3, 0.2], [1, 1]) is None  # one class only


def test_diagnose_reads_the_unguided_noise_and_probes_the_gradient(tiny_pipe, tmp_path):
    torch.manual_seed(0)
    head = CompositionClassifier(ClassifierConfig(layers=2, tiles=(3, 2, 2), label_dim=8, timestep_conditioned=True))
    label = torch.randn(1, 8)
    objective = ClassifierObjective(head, encoder=lambda labels: label.expand(len(labels), -1))
    pipe = CVGPipeline(tiny_pipe, objective=objective, guidance=GuidanceConfig(pool=(1, 2, 2)))
    specs, unguided = tmp_path / "specs", tmp_path / "unguided"
    write_dataset(specs, 4, 0, ("spatial", "motion"), frames=9, height=64, width=64)
    generate_set(pipe, specs, unguided, guide_steps=0, num_inference_steps=3, max_sequence_length=512)
    result = diagnostics.diagnose(pipe, unguided, clips=4, direction_clips=2, strength=0.1)
    assert result["clips"] == 4 and set(result["auroc"]) == {"all", "spatial", "motion"}
    assert all(v is None or 0 <= v <= 1 for v in result["auroc"].values())
    direction = result["gradient_direction"]
    assert direction["clips"] == 2 and math.isfinite(direction["median_ratio"])
    assert 0 < direction["median_p_before"] < 1
    # Step 0's reading is the unguided clip's own noise: the probability recomputed by hand matches.
    record = read_index(unguided)[0]
    denoiser, bound, noise, t = diagnostics._initial(pipe, record)
    noise_again = tiny_pipe.prepare_latents(
        1,
        tiny_pipe.transformer.config.in_channels,
        64,
        64,
        9,
        torch.float32,
        "cpu",
        torch.Generator().manual_seed(record["id"]),
    )
    assert torch.equal(noise, noise_again)
    baseline = diagnostics.smooth_baseline(noise.numel())  # every clip's latent has this size
    assert direction["median_ratio_over_smooth_baseline"] == pytest.approx(direction["median_ratio"] / baseline)
    guiding = pipe.guiding_objective(bound.composition.kind, pipe.guidance)  # the head plus the centroid term
    assert guiding is not objective
    by_hand = torch.exp(-denoiser.score(noise, t, guiding, bound, pipe.guidance)[0])
    assert diagnostics.step0_probability(pipe, record) == float(by_hand)


def test_a_linear_function_sits_at_the_smooth_baseline():
    """Any smooth function's ratio of the drop along its normalised gradient to its mean absolute change
    along random directions of the same size is sqrt(pi D / 2): what the diagnostic divides by."""
    rng = np.random.default_rng(0)
    dimensions = 10_240
    gradient = rng.standard_normal(dimensions)
    along = gradient @ (gradient / np.linalg.norm(gradient))
    randoms = rng.standard_normal((2000, dimensions))
    spread = np.abs(randoms / np.linalg.norm(randoms, axis=1, keepdims=True) @ gradient).mean()
    assert along / spread / diagnostics.smooth_baseline(dimensions) == pytest.approx(1.0, abs=0.05)
