"""The paper's findings measured on CompShapes: guidance by the dual-inversion classifier against the rest.

    python -m cvg.experiments.findings --model models/compshapes-wan --classifier models/compshapes-classifier

Every row generates the same held-out prompts (`grammar.held_out`, the four compositional categories in
turn, spec seed 20261124) with the same noise (seed = clip id), 20 steps, CFG 5; the CompShapes judge
scores them (95% Wilson intervals) and the Fréchet distance of CompShapes clip features to fresh renders
measures quality. Rows (choose with --rows):
  unguided      the generator alone
  cvg-2         CVG: the classifier's gradient on the first 2 steps (the default)
  cvg-1, cvg-4  the first 1 or 4 steps
  cvg-all       every step
  single        the classifier trained without dual inversion (readings under the true prompt only)
  training-free the objectives that need no training (presence, centroid relation, centroid motion)
Generated sets are kept under WORK per model and row, so a run resumes and rows can be added later.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cvg.bench import machine_line, publish
from cvg.compshapes.dataset import write_dataset
from cvg.compshapes.evaluate import evaluate
from cvg.dual_inversion import GUIDED_CATEGORIES, SINGLE_READING
from cvg.engine import model_key
from cvg.experiments.generator import SPEC_SEED, table
from cvg.pipeline import CVGPipeline, load_wan_pipeline
from cvg.sampler import GuidanceConfig
from cvg.videoset import generate_set

ROWS = ("unguided", "cvg-2", "cvg-1", "cvg-4", "cvg-all", "single", "training-free")
NAMES = {
    "unguided": "unguided",
    "cvg-2": "CVG, first 2 steps (default)",
    "cvg-1": "CVG, first step",
    "cvg-4": "CVG, first 4 steps",
    "cvg-all": "CVG, all steps",
    "single": "CVG without dual inversion",
    "training-free": "training-free objectives, first 2 steps",
}


def row_pipeline(row: str, base, args: argparse.Namespace) -> tuple[CVGPipeline, int]:
    """The pipeline and guide_steps a row generates with."""
    guide_steps = {"unguided": 0, "cvg-1": 1, "cvg-4": 4, "cvg-all": args.steps}.get(row, 2)
    pipe = CVGPipeline(base, guidance=GuidanceConfig(guide_steps=guide_steps, strength=args.strength))
    if row in ("cvg-2", "cvg-1", "cvg-4", "cvg-all"):
        pipe.load_classifier(args.classifier)
    elif row == "single":
        pipe.load_classifier(Path(args.classifier) / SINGLE_READING)
    return pipe, guide_steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/compshapes-wan", help="the generator directory")
    parser.add_argument("--classifier", default="models/compshapes-classifier", help="cvg train-classifier output")
    parser.add_argument("--clips", type=int, default=400, help="held-out clips, categories in turn (default 400)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run (default all: {','.join(ROWS)})")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--strength", type=float, default=GuidanceConfig.strength,
                        help=f"RMS of one guided latent update (default {GuidanceConfig.strength})")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path(".cache/experiments/findings"), help="working directory")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    started = time.perf_counter()
    base = load_wan_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    specs = args.work / "specs"
    write_dataset(specs, args.clips, SPEC_SEED, GUIDED_CATEGORIES, split="heldout")
    work = args.work / f"{model_key(base.vae)}-{model_key(base.transformer)}-strength{args.strength:g}"
    results, seconds = {}, {}
    for row in rows:
        pipe, guide_steps = row_pipeline(row, base, args)
        sampled = generate_set(pipe, specs, work / row, seed=0, guide_steps=guide_steps,
                               num_inference_steps=args.steps, guidance_scale=5.0)  # fmt: skip
        results[NAMES[row]] = evaluate(work / row)
        seconds[row] = sampled["seconds_per_clip"]
        print(f"{row}: done ({sampled['generated']} clips generated now)", flush=True)
    timing = ", ".join(f"{r} {s:.2f} s" for r, s in seconds.items() if s is not None)
    text = (
        f"Command: `python -m cvg.experiments.findings --model {args.model} --classifier {args.classifier} "
        f"--clips {args.clips} --rows {','.join(rows)}`\n\n"
        f"{machine_line()}. {args.clips} held-out clips ({', '.join(GUIDED_CATEGORIES)} in turn; prompts never "
        f"trained on; spec seed {SPEC_SEED}; noise seed = clip id, the same in every row), {args.steps} steps, "
        f"CFG 5, guidance strength {args.strength:g}; accuracy with 95% Wilson intervals; Fréchet distance of "
        f"CompShapes clip features to fresh renders.\n\n{table(results)}\n\n"
        f"Seconds per clip (median, rows generated in this run): {timing or 'all reused'}. "
        f"This run took {time.perf_counter() - started:.0f} s."
    )
    publish(text, args.write, "findings")


if __name__ == "__main__":
    main()
