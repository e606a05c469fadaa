"""`cvg compshapes-dataset` and `cvg eval`: CompShapes clips and their judging."""

from __future__ import annotations

import argparse
import json

from cvg.cli.arguments import COUNT, POSITIVE, SEED, number
from cvg.compshapes.grammar import CATEGORIES, SINGLE, SPLITS


def add_parsers(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("compshapes-dataset", help="render a CompShapes dataset (resumable)")
    data.add_argument("--out", required=True, help="dataset directory (index.jsonl + clips/)")
    data.add_argument("--count", type=COUNT, required=True, help="number of clips; categories take turns")
    data.add_argument("--seed", type=SEED, default=0, help="dataset seed (default 0)")
    data.add_argument("--frames", type=POSITIVE, default=17, help="frames per clip (default 17)")
    data.add_argument(
        "--size", type=number(int, 8, 4096), default=64, help="clip height and width in pixels (default 64)"
    )
    data.add_argument(
        "--categories",
        type=lambda t: tuple(t.split(",")),
        default=CATEGORIES,
        help=f"comma-separated, taking turns (default {','.join(CATEGORIES)}; also {SINGLE})",
    )
    data.add_argument(
        "--split",
        choices=("all", *SPLITS),
        default="all",
        help="prompts: all, or only those of the sealed train, dev or test split (default all)",
    )
    data.set_defaults(run=compshapes_dataset)

    evaluation = commands.add_parser("eval", help="judge videos against their compositions (CompShapes)")
    evaluation.add_argument("--videos", required=True, help="directory holding the clips (.npz frames or videos)")
    evaluation.add_argument("--specs", help="index JSONL (file, prompt, composition, ...); default VIDEOS/index.jsonl")
    evaluation.add_argument("--json", help="also write the full report (with failures) here")
    evaluation.add_argument("--reference", help="dataset of renders for the Fréchet distance (default: fresh renders)")
    evaluation.add_argument("--no-quality", action="store_true", help="skip the Fréchet distance and artefact rates")
    evaluation.set_defaults(run=evaluate_videos)


def compshapes_dataset(args: argparse.Namespace) -> None:
    from cvg.compshapes.dataset import write_dataset

    written = write_dataset(
        args.out, args.count, args.seed, args.categories, args.frames, args.size, args.size, args.split
    )
    print(json.dumps({"dataset": args.out, "written": written, "count": args.count}))


def evaluate_videos(args: argparse.Namespace) -> None:
    from cvg.compshapes.evaluate import evaluate
    from cvg.io.files import check_writable, write_text_atomic

    if args.json:
        check_writable(args.json, "--json")
    report = evaluate(args.videos, args.specs, args.reference, quality=not args.no_quality)
    for category, entry in report["categories"].items():
        low, high = entry["ci95"]
        line = (
            f"{category:<10} accuracy {entry['accuracy']:.3f}  95% CI [{low:.3f}, {high:.3f}] (by prompt)  "
            f"clips {entry['clips']}  prompts {entry['prompts']}  drawn {entry['drawn']:.3f}"
        )
        if "counterfactual_rejection" in entry:
            line += f"  counterfactuals rejected {entry['counterfactual_rejection']:.3f}"
        print(line)
    if "quality" in report:
        q = report["quality"]
        print(
            f"quality    Fréchet distance {q['frechet_distance']:.2f} (vs {q['reference_clips']} renders)  "
            f"empty frames {q['empty_frames']:.3f}  colour bleeding {q['colour_bleeding']:.3f}"
        )
    if args.json:
        write_text_atomic(args.json, json.dumps(report, indent=1))
