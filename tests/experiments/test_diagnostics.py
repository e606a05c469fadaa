"""The two fast diagnostics of a guidance head (cvg.experiments.diagnostics) and the AUROC they rest on."""

import math

import torch

from cvg.compshapes.dataset import read_index, write_dataset
from cvg.compshapes.stats import auroc
from cvg.compshapes.videoset import generate_set
from cvg.experiments import diagnostics
from cvg.guidance.classifier import ClassifierConfig, ClassifierObjective, CompositionClassifier
from cvg.guidance.config import GuidanceConfig
from cvg.pipeline import CVGPipeline


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
    result = diagnostics.diagnose(pipe, unguided, clips=4, adversarial_clips=2, strength=0.1)
    assert result["clips"] == 4 and set(result["auroc"]) == {"all", "spatial", "motion"}
    assert all(v is None or 0 <= v <= 1 for v in result["auroc"].values())
    adversarial = result["adversarial"]
    assert adversarial["clips"] == 2 and math.isfinite(adversarial["median_ratio"])
    assert 0 < adversarial["median_p_before"] < 1
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
    by_hand = torch.exp(-denoiser.score(noise, t, objective, bound, pipe.guidance)[0])
    assert diagnostics.step0_probability(pipe, record) == float(by_hand)
