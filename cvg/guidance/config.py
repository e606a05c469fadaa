"""`GuidanceConfig`: how guided steps move the latent. Plain data (no torch): the command line builds it
without loading the model stack."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cvg.request import MAX_ITERATIONS, documented

NORMALIZATIONS = ("rms", "max", "none", "polyak")
MAX_CANDIDATES = 64  # initial noises scored per video
MAX_RECURRENCE = 16  # rounds of a guided step (Universal Guidance used up to 10)


@dataclass
class GuidanceConfig:
    """Defaults chosen on held-out prompts (docs/classifier.md): the first 4 steps, one Polyak-sized update
    each, no update larger than RMS 0.1, none past the objective's own target, and for spatial and motion
    compositions the training-free centroid objective added to the classifier's loss. Three updates a step
    won on 60 training prompts and lost on held-out ones (Fréchet distance 63% worse); one a step improved
    both. The centroid term took the 400 held-out prompts from +4.8 to +10.5 points over unguided."""

    guide_steps: int = documented(4, "guided steps at the start")
    guide_sigma: float | None = documented(None, "guide every step whose sigma is at least this (sets guide_steps)")
    candidates: int = documented(
        1,
        "initial noises drawn per video; the one the objective scores best at the first step is denoised",
        low=1,
        high=MAX_CANDIDATES,
    )
    geometric: bool = documented(
        True,
        "with a classifier: add the training-free objective of spatial and motion compositions "
        "(centroid relation, centroid motion) to its loss",
    )
    strength: float = documented(0.1, "RMS of each latent update, the largest with normalize polyak")
    iterations: int = documented(
        1, "at most this many updates per guided step (fewer once target_loss is reached)", low=1, high=MAX_ITERATIONS
    )
    read_sigma: float | None = documented(
        None,
        "read the maps at the denoised estimate re-noised to this sigma (a full forward more per update, the "
        "gradient through it; flow-matching families); None: at the latent itself",
        low=0,
        high=1,
    )
    recurrence: int = documented(
        1,
        "self-recurrence (Universal Guidance): a guided step's updates are made this many times, the latent "
        "taken one Euler step down and re-noised back to the step's level in between",
        low=1,
        high=MAX_RECURRENCE,
    )
    normalize: str = documented(
        "polyak",
        "step rule: rms / max gradient normalisation, none, or polyak (the "
        "first-order step to the target loss; see latent_update)",
    )
    target_loss: float | None = documented(
        None, "leave an item alone once its objective is this low; None: see bounded"
    )
    bounded: bool = documented(
        True,
        "with target_loss None: stop at the objective's own target_loss (a "
        "classifier's -log confidence; none for the training-free objectives)",
    )
    layers: list[int] | None = documented(None, "blocks whose maps are read, e.g. 0,1,2; None: all")
    pool: tuple[int, int, int] = documented((1, 2, 2), "pooling of the frames,height,width token grid")
    backend: str = documented("auto", "attention_pool backend")
    checkpointing: bool | None = documented(
        None,
        "recompute blocks in backward (activations of one block at a time); None: only where the recorded "
        "blocks' saved activations would pass 1 GiB (cvg.guidance.activations.saved_activation_bytes)",
    )
    collapse_padding: bool = documented(
        True, "guided forwards skip Wan's zero text padding, exactly (cvg.models.padding)"
    )

    def check(self, num_inference_steps: int) -> None:
        if not 0 <= self.guide_steps <= num_inference_steps:
            raise ValueError(
                f"guide_steps must be between 0 and num_inference_steps ({num_inference_steps}), got {self.guide_steps}"
            )
        # Every loop count bounded, whichever door it came in by: no setting runs for hours.
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be between 1 and {MAX_CANDIDATES}, got {self.candidates}")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be between 1 and {MAX_ITERATIONS}, got {self.iterations}")
        if not 1 <= self.recurrence <= MAX_RECURRENCE:
            raise ValueError(f"recurrence must be between 1 and {MAX_RECURRENCE}, got {self.recurrence}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"guidance strength must be finite and >= 0, got {self.strength}")
        if self.read_sigma is not None and not 0 <= self.read_sigma <= 1:
            raise ValueError(f"read_sigma must be in [0, 1], got {self.read_sigma}")
        if self.guide_sigma is not None and not 0 < self.guide_sigma <= 1:
            raise ValueError(f"guide_sigma must be in (0, 1], got {self.guide_sigma}")
        if self.target_loss is not None and not math.isfinite(self.target_loss):
            raise ValueError(f"target_loss must be finite or None, got {self.target_loss}")
