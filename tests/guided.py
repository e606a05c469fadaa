"""What the guidance tests share: prompts of each composition kind, the objectives, and the objective a
pipeline's guided steps leave at the latent (tests/test_pipeline.py, test_families.py, test_text_path.py)."""

import torch

from cvg.guidance.classifier import ClassifierConfig, ClassifierObjective, CompositionClassifier
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import MotionDirection, SpatialRelation, TokenPresence
from cvg.pipeline import CVGPipeline

PROMPTS = {
    "spatial": ("a red cube to the left of a blue ball", "red cube left of blue ball"),
    "motion": ("a blue ball moves right", "blue ball moves right"),
    "presence": ("a red cube and a blue ball", "red cube and blue ball"),
}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classifier_objective() -> ClassifierObjective:
    """A random classifier over 3 x 4 x 4 tiles of 2 layers, scoring one fixed label."""
    torch.manual_seed(0)
    classifier = CompositionClassifier(ClassifierConfig(layers=2, tiles=(3, 4, 4), label_dim=8))
    label = torch.randn(1, 8)
    return ClassifierObjective(classifier, encoder=lambda labels: label.expand(len(labels), -1))


OBJECTIVES = {
    "presence": ("presence", TokenPresence()),
    "spatial": ("spatial", SpatialRelation()),
    "motion": ("motion", MotionDirection()),
    "classifier": ("spatial", classifier_objective()),
}


def objective_after_guided_steps(pipe, kind: str, objective, seed: int, guide_steps: int, size: dict) -> float:
    """The objective at the latent after the first 2 scheduler steps (of `size`'s schedule), read at the
    third step's timestep by `pipe.transformer` as the pipeline runs it (TI2V's per-token timesteps,
    CogVideoX's rotary embeddings)."""
    prompt, composition = PROMPTS[kind]
    config = GuidanceConfig(guide_steps=guide_steps, strength=0.3, pool=(1, 1, 1))
    cvg, captured = CVGPipeline(pipe, objective=objective, guidance=config), {}

    def keep(i, t, latents):
        if i == 1:
            captured["latents"] = latents.clone()

    cvg(prompt, composition, guidance_scale=5.0, generator=seeded(seed), output_type="latent", on_step=keep, **size)
    text = size["max_sequence_length"]
    embeds, _ = cvg.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=text)
    denoiser = cvg.steps.denoisers(embeds, None, captured["latents"], 1.0)["transformer"]
    bound = cvg.bind(prompt, composition, text)
    loss, _, _ = denoiser.score(captured["latents"], pipe.scheduler.timesteps[2], objective, bound, config)
    return loss.item()
