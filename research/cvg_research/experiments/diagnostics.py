"""Two fast checks of a guidance objective, before any guided generation:

    python -m cvg_research.experiments.diagnostics --model models/compshapes-wan \
        --classifier models/compshapes-classifier \
        --unguided .cache/experiments/findings/<row folder>/unguided

- step-0 AUROC: p(label) at each clip's initial noise (the head's reading at the first guided step)
  against the judge's verdict on the unguided clip grown from that same noise. Guidance at step 0 can
  only help if the head can rank noises at all: 0.5 is chance.
- gradient-direction ratio: at the initial noise, the drop of the objective along the guidance direction
  (one RMS-normalised step of `--strength`) against its mean absolute change along random directions of
  the same size, reported over its baseline. For any smooth function of a D-dimensional latent that ratio
  is about sqrt(pi D / 2) (a random direction's cosine with the gradient has mean absolute value
  sqrt(2 / (pi D))): about 127 for D = 10,240. So the ratio alone says nothing; over its baseline, about 1
  means the objective is locally linear at that step size, far above 1 that the step drops it more than
  its slope predicts (a direction that fools the head faster than it changes the maps).

Both are computed on the objective that guides: the classifier plus, where `GuidanceConfig.geometric`
adds it, the training-free centroid term (`CVGPipeline.guiding_objective`).

`--unguided` is a generated set (`cvg_research.compshapes.videoset.generate_set` with seed 0, as the findings'
unguided row): each record's noise seed is its id.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from cvg import threads
from cvg.guidance.composition import Composition
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import Objective
from cvg.guidance.sampler import Denoiser
from cvg.pipeline import CVGPipeline
from cvg_research.compshapes.dataset import read_index
from cvg_research.compshapes.evaluate import load_frames
from cvg_research.compshapes.judge import judge
from cvg_research.compshapes.stats import auroc


def _initial(pipe: CVGPipeline, record: dict) -> tuple[Denoiser, object, torch.Tensor, torch.Tensor]:
    """(denoiser under the record's prompt, bound composition, initial noise, first timestep) as the
    pipeline makes them for noise seed = record id."""
    wan, scene = pipe.pipe, record["scene"]
    embeds = wan.encode_prompt(record["prompt"], do_classifier_free_guidance=False)[0]
    bound = pipe.bind(record["prompt"], Composition.from_dict(record["composition"]))
    noise = wan.prepare_latents(
        1,
        wan.transformer.config.in_channels,
        scene["height"],
        scene["width"],
        scene["frames"],
        torch.float32,
        wan._execution_device,
        torch.Generator().manual_seed(int(record["id"])),
    )
    wan.scheduler.set_timesteps(20)
    return Denoiser(wan.transformer, embeds, None, 1.0), bound, noise, wan.scheduler.timesteps[0]


def _objective(pipe: CVGPipeline, bound) -> Objective:
    """The objective the pipeline guides this composition's kind with."""
    return pipe.guiding_objective(bound.composition.kind, pipe.guidance)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.square().mean().sqrt().clamp_min(1e-20)


def smooth_baseline(dimensions: int) -> float:
    """The gradient-direction ratio of a smooth (locally linear) function of `dimensions` variables."""
    return math.sqrt(math.pi * dimensions / 2)


def gradient_direction_ratio(pipe: CVGPipeline, record: dict, strength: float, directions: int = 4) -> dict:
    """Objective drop along the normalised guidance step against random directions of the same RMS."""
    denoiser, bound, noise, t = _initial(pipe, record)
    config, objective = pipe.guidance, _objective(pipe, bound)
    loss, _, grad = denoiser.score(noise, t, objective, bound, config, gradient=True)
    along = denoiser.score(noise - strength * _unit(grad), t, objective, bound, config)[0]
    rng = torch.Generator().manual_seed(int(record["id"]))
    random = [
        denoiser.score(noise + strength * _unit(torch.randn(noise.shape, generator=rng)), t, objective, bound, config)[
            0
        ]
        for _ in range(directions)
    ]
    drop = float(loss - along)
    spread = float(np.mean([abs(float(loss - r)) for r in random]))
    return {
        "loss": float(loss),
        "drop_along_gradient": drop,
        "mean_random_change": spread,
        "ratio": drop / max(spread, 1e-12),
        "ratio_over_smooth_baseline": drop / max(spread, 1e-12) / smooth_baseline(noise.numel()),
    }


@torch.no_grad()
def step0_probability(pipe: CVGPipeline, record: dict) -> float:
    """exp(-objective) at the record's initial noise: p(label) for a classifier objective (for the
    training-free ones a score that ranks the same way as their loss)."""
    denoiser, bound, noise, t = _initial(pipe, record)
    return float(torch.exp(-denoiser.score(noise, t, _objective(pipe, bound), bound, pipe.guidance)[0]))


def diagnose(
    pipe: CVGPipeline,
    unguided: str | Path,
    clips: int = 400,
    direction_clips: int = 40,
    strength: float | None = None,
) -> dict:
    """Step-0 AUROC per category and overall over the first `clips` records of the generated set `unguided`,
    and the gradient-direction ratio over its first `direction_clips`."""
    records = read_index(unguided)[:clips]
    if not records:
        raise FileNotFoundError(f"no generated clips in {unguided}")
    strength = pipe.guidance.strength if strength is None else strength
    scores, verdicts, categories = [], [], []
    for record in records:
        frames = load_frames(Path(unguided) / record["file"])
        verdicts.append(judge(frames, Composition.from_dict(record["composition"])).ok)
        scores.append(step0_probability(pipe, record))
        categories.append(record.get("category", record["composition"]["kind"]))
    result = {"clips": len(records), "auroc": {"all": auroc(scores, verdicts)}}
    for category in sorted(set(categories)):
        mask = np.array([c == category for c in categories])
        result["auroc"][category] = auroc(np.array(scores)[mask], np.array(verdicts)[mask])
    ratios = [gradient_direction_ratio(pipe, r, strength) for r in records[:direction_clips]]
    result["gradient_direction"] = {
        "clips": len(ratios),
        "strength": strength,
        "median_ratio": float(np.median([r["ratio"] for r in ratios])),
        "median_ratio_over_smooth_baseline": float(np.median([r["ratio_over_smooth_baseline"] for r in ratios])),
        "median_drop_along_gradient": float(np.median([r["drop_along_gradient"] for r in ratios])),
        "median_random_change": float(np.median([r["mean_random_change"] for r in ratios])),
        "median_p_after_step": float(np.median([np.exp(-(r["loss"] - r["drop_along_gradient"])) for r in ratios])),
        "median_p_before": float(np.median([np.exp(-r["loss"]) for r in ratios])),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    threads.configure()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/compshapes-wan", help="the generator directory")
    parser.add_argument(
        "--classifier",
        default="models/compshapes-classifier",
        help="the head to diagnose; 'none': the training-free objectives",
    )
    parser.add_argument("--unguided", required=True, type=Path, help="the unguided generated set (findings row)")
    parser.add_argument("--clips", type=int, default=400, help="clips for the AUROC (default 400)")
    parser.add_argument("--direction-clips", type=int, default=40, help="clips for the ratio (default 40)")
    parser.add_argument(
        "--strength",
        type=float,
        default=GuidanceConfig.strength,
        help=f"RMS of the probe step (default {GuidanceConfig.strength})",
    )
    args = parser.parse_args(argv)
    pipe = CVGPipeline.from_pretrained(args.model)
    if args.classifier != "none":
        pipe.load_classifier(args.classifier)
    print(json.dumps(diagnose(pipe, args.unguided, args.clips, args.direction_clips, args.strength), indent=1))


if __name__ == "__main__":
    main()
