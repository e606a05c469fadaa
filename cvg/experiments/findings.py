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
  transfer      label transfer: the classifier trained without the held-out wordings (`label-transfer`),
                guiding with labels phrased only in them ("red block on the left side of blue sphere")
Generated sets are kept under WORK per model and row, so a run resumes and rows can be added later.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from scipy.stats import binomtest

from cvg.bench import machine_line, publish
from cvg.classifier import CONFIG_NAME, WEIGHTS_NAME, label_of
from cvg.composition import Composition
from cvg.compshapes.dataset import read_index, write_dataset, write_index
from cvg.compshapes.evaluate import evaluate
from cvg.compshapes.grammar import transfer_wording
from cvg.dual_inversion import GUIDED_CATEGORIES, LABEL_TRANSFER, SINGLE_READING
from cvg.engine import model_key
from cvg.experiments.generator import SPEC_SEED, table
from cvg.pipeline import CVGPipeline, load_wan_pipeline
from cvg.sampler import GuidanceConfig
from cvg.videoset import generate_set

ROWS = ("unguided", "cvg-2", "cvg-1", "cvg-4", "cvg-all", "single", "training-free", "transfer")
NAMES = {
    "unguided": "unguided",
    "cvg-2": "CVG, first 2 steps (default)",
    "cvg-1": "CVG, first step",
    "cvg-4": "CVG, first 4 steps",
    "cvg-all": "CVG, all steps",
    "single": "CVG without dual inversion",
    "training-free": "training-free objectives, first 2 steps",
    "transfer": "label transfer: unseen wordings, first 2 steps",
}


def row_pipeline(row: str, base, args: argparse.Namespace) -> tuple[CVGPipeline, int, str]:
    """The pipeline, guide_steps and output folder name of a row. A classifier row's folder names the
    classifier's weights, so a retrained classifier never reuses another's clips."""
    guide_steps = {"unguided": 0, "cvg-1": 1, "cvg-4": 4, "cvg-all": args.steps}.get(row, 2)
    pipe = CVGPipeline(base, guidance=GuidanceConfig(guide_steps=guide_steps, strength=args.strength))
    if row in ("unguided", "training-free"):
        return pipe, guide_steps, row
    directory = Path(args.classifier) / {"single": SINGLE_READING, "transfer": LABEL_TRANSFER}.get(row, "")
    pipe.load_classifier(directory)
    digest = hashlib.sha256(b"".join((directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)))
    return pipe, guide_steps, f"{row}-{digest.hexdigest()[:16]}"


def paired(results: dict[str, dict], base: str) -> str:
    """Each row against `base` on the same clips (same prompts, same noise): how many clips it turns right
    and wrong, and the exact McNemar p (a two-sided binomial test on those discordant pairs)."""
    failed = {name: {f["file"] for f in report["failures"]} for name, report in results.items()}
    lines = [f"| row | right where {base} is wrong | wrong where {base} is right | McNemar p |", "|---|---|---|---|"]
    for name in results:
        if name != base:
            gained, lost = len(failed[base] - failed[name]), len(failed[name] - failed[base])
            p = binomtest(gained, gained + lost).pvalue if gained + lost else 1.0
            lines.append(f"| {name} | {gained} | {lost} | {p:.2g} |")
    return "\n".join(lines)


def transfer_specs(specs: Path) -> Path:
    """A copy of the spec index (beside it) whose composition labels use only the held-out transfer wordings."""
    out = specs.with_name(f"{specs.name}-transfer")
    records = []
    for record in read_index(specs):
        label = transfer_wording(label_of(Composition.from_dict(record["composition"])))
        records.append({**record, "composition": {**record["composition"], "label": label}})
    out.mkdir(parents=True, exist_ok=True)
    write_index(out, records)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/compshapes-wan", help="the generator directory")
    parser.add_argument("--classifier", default="models/compshapes-classifier", help="cvg train-classifier output")
    parser.add_argument("--clips", type=int, default=400, help="held-out clips, categories in turn (default 400)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run (default all: {','.join(ROWS)})")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="held-out prompts (the findings) or training ones (for tuning)")  # fmt: skip
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
    suffix = "" if args.split == "heldout" else "-train"  # held-out folders keep their earlier names
    specs = args.work / f"specs{suffix}"
    write_dataset(specs, args.clips, SPEC_SEED, GUIDED_CATEGORIES, split=args.split)
    work = args.work / f"{model_key(base.vae)}-{model_key(base.transformer)}-strength{args.strength:g}{suffix}"
    results, seconds = {}, {}
    for row in rows:
        pipe, guide_steps, folder = row_pipeline(row, base, args)
        row_specs = transfer_specs(specs) if row == "transfer" else specs
        sampled = generate_set(pipe, row_specs, work / folder, seed=0, guide_steps=guide_steps,
                               num_inference_steps=args.steps, guidance_scale=5.0, limit=args.clips)  # fmt: skip
        results[NAMES[row]] = evaluate(work / folder, limit=args.clips)  # a folder may hold more from a bigger run
        seconds[row] = sampled["seconds_per_clip"]
        print(f"{row}: done ({sampled['generated']} clips generated now)", flush=True)
    prompts = "held-out clips (prompts never trained on)" if args.split == "heldout" else "clips of training prompts"
    options = f" --strength {args.strength:g}" + (" --split train" if args.split == "train" else "")
    timing = ", ".join(f"{r} {s:.2f} s" for r, s in seconds.items() if s is not None)
    text = (
        f"Command: `python -m cvg.experiments.findings --model {args.model} --classifier {args.classifier} "
        f"--clips {args.clips} --rows {','.join(rows)}{options}`\n\n"
        f"{machine_line()}. {args.clips} {prompts}, {', '.join(GUIDED_CATEGORIES)} in turn (spec seed {SPEC_SEED}; "
        f"noise seed = clip id, the same in every row), {args.steps} steps, CFG 5, guidance strength "
        f"{args.strength:g}; accuracy with 95% Wilson intervals; Fréchet distance of CompShapes clip features to "
        f"fresh renders.\n\n{table(results)}\n\n"
        + (f"Paired with the unguided row:\n\n{paired(results, NAMES['unguided'])}\n\n" if "unguided" in rows else "")
        + f"Seconds per clip (median, rows generated in this run): {timing or 'all reused'}. "
        f"This run took {time.perf_counter() - started:.0f} s."
    )
    publish(text, args.write, "findings")


if __name__ == "__main__":
    main()
