"""A VAE stage checkpoint, judged: sealed-split clips through the VAE and back, per category, with reasons.

    python -m cvg_research.experiments.vae runs/generator-v6/.work/vae_refine.pt --clips 50 --split dev

What decides whether a generator's training may go on past its VAE (docs/generator.md): the generator can
draw no better than its VAE's round trip. The architecture is read from the run's recipe (`--recipe`, by
default the `recipe.json` beside the checkpoint). Round trips land in WORK (default
.cache/experiments/vae/<weights hash>-<split>) and are reused when the command is run again.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from cvg import threads
from cvg.io.video import contact_sheet, save_image
from cvg.models.wan import model_key
from cvg_research.compshapes.dataset import read_frames, read_index, write_dataset
from cvg_research.compshapes.evaluate import evaluate, load_frames
from cvg_research.compshapes.grammar import ALL_CATEGORIES
from cvg_research.experiments.generator import round_trip
from cvg_research.training.recipe import GeneratorRecipe
from cvg_research.training.vae import build_vae, load_vae_checkpoint

SPEC_SEED = 4242  # the clips every VAE checkpoint since the fifth generator was judged on (docs/generator.md)


def load_checkpoint_vae(checkpoint: Path, recipe: Path | None = None) -> torch.nn.Module:
    """The VAE of a stage checkpoint, built from its run's recipe."""
    recipe = recipe or checkpoint.parent / "recipe.json"
    if not recipe.is_file():
        raise FileNotFoundError(f"no recipe at {recipe}: pass --recipe (the run's recipe.json)")
    vae = build_vae(GeneratorRecipe.from_file(recipe)).eval()
    vae.load_state_dict(load_vae_checkpoint(checkpoint))
    return vae


def failing_sheet(specs: Path, trips: Path, failures: list[dict], out: Path, count: int = 8) -> None:
    """Rendered clip above its round trip (nine frames picked evenly) for the first `count` failures."""
    records = {r["file"]: r for r in read_index(specs)}
    rows = []
    for failure in failures[:count]:
        record = records[failure["file"]]
        rows.append((record["prompt"], read_frames(specs, record)))
        rows.append((failure["reason"], load_frames(trips / failure["file"])))
    if not rows:
        raise ValueError("no failing round trips to show")
    save_image(contact_sheet(rows, columns=min(9, len(rows[0][1]))), out)


def main(argv: list[str] | None = None) -> None:
    threads.configure()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a VAE stage checkpoint (vae.pt or vae_refine.pt of a run)")
    parser.add_argument("--recipe", type=Path, help="the run's recipe.json (default: beside the checkpoint)")
    parser.add_argument("--clips", type=int, default=50, help="clips, categories in turn (default 50)")
    parser.add_argument("--split", choices=("dev", "test"), default="dev", help="the sealed split (default dev)")
    parser.add_argument(
        "--frames", type=int, default=17, help="frames a clip (1: still images, the path frame 0 takes; no motion)"
    )
    parser.add_argument("--work", type=Path, default=Path(".cache/experiments/vae"), help="working directory")
    parser.add_argument("--sheet", type=Path, help="write failing clips and their round trips to this PNG")
    args = parser.parse_args(argv)
    vae = load_checkpoint_vae(args.checkpoint, args.recipe)
    categories = ALL_CATEGORIES if args.frames > 1 else tuple(c for c in ALL_CATEGORIES if c != "motion")
    name = f"{args.split}-{SPEC_SEED}-{args.frames}"
    specs = args.work / f"specs-{name}"
    write_dataset(specs, args.clips, SPEC_SEED, categories, args.frames, split=args.split)
    trips = args.work / f"{model_key(vae)}-{name}"
    round_trip(vae, specs, trips)
    report = evaluate(trips, quality=False, limit=args.clips)
    kept = {c: (round(s["accuracy"] * s["clips"]), s["clips"]) for c, s in report["categories"].items()}
    total = sum(k for k, _ in kept.values())
    print(f"{args.checkpoint}: {total} of {args.clips} {args.split} round trips judged right (spec seed {SPEC_SEED})")
    for category, (right, clips) in kept.items():
        print(f"  {category}: {right}/{clips}")
    reasons = Counter(f["reason"].split(" in ")[0] for f in report["failures"])
    for reason, count in reasons.most_common(12):
        print(f"  {count} x {reason}")
    if args.sheet:
        failing_sheet(specs, trips, report["failures"], args.sheet)
        print(f"failing clips: {args.sheet}")


if __name__ == "__main__":
    main()
