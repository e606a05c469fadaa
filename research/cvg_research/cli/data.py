"""`cvg compshapes-dataset`, `cvg sample` and `cvg eval`: CompShapes clips, videos generated for their specs,
and their judging."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvg.cli.arguments import COUNT, POSITIVE, SEED, config_flags, number
from cvg.cli.generation import add_model_flags, load_pipeline
from cvg.request import GenerationRequest
from cvg_research.compshapes.grammar import CATEGORIES, SINGLE, SPLITS


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

    sample = commands.add_parser(
        "sample",
        help="generate one clip per record of a spec set (resumable)",
        description="Generate a video set for `cvg eval`: one clip per record of a dataset index, at each "
        "record's scene size, with seed SEED + id.",
    )
    add_model_flags(sample)
    sample.add_argument("--specs", required=True, help="dataset directory or index JSONL with prompts and compositions")
    sample.add_argument("--out", required=True, help="output directory (index.jsonl + clips/)")
    sample.add_argument("--limit", type=COUNT, help="only the first LIMIT records")
    config_flags(sample, GenerationRequest, {"seed": {"help": "base seed; record i uses SEED + i (default 0)"}})
    sample.set_defaults(run=sample_set)

    evaluation = commands.add_parser("eval", help="judge videos against their compositions (CompShapes)")
    evaluation.add_argument("--videos", required=True, help="directory holding the clips (.npz frames or videos)")
    evaluation.add_argument("--specs", help="index JSONL (file, prompt, composition, ...); default VIDEOS/index.jsonl")
    evaluation.add_argument("--json", help="also write the full report (with failures) here")
    evaluation.add_argument("--reference", help="dataset of renders for the Fréchet distance (default: fresh renders)")
    evaluation.add_argument("--no-quality", action="store_true", help="skip the Fréchet distance and artefact rates")
    evaluation.set_defaults(run=evaluate_videos)


def compshapes_dataset(args: argparse.Namespace) -> None:
    from cvg_research.compshapes.dataset import write_dataset

    written = write_dataset(
        args.out, args.count, args.seed, args.categories, args.frames, args.size, args.size, args.split
    )
    print(json.dumps({"dataset": args.out, "written": written, "count": args.count}))


def sample_set(args: argparse.Namespace) -> None:
    from cvg.io.files import check_writable
    from cvg_research.compshapes.videoset import generate_set

    check_writable(Path(args.out) / "index.jsonl", "--out")
    pipe, call = load_pipeline(args)
    result = generate_set(
        pipe, args.specs, args.out, args.seed, args.limit, report=lambda line: print(line, file=sys.stderr), **call
    )
    print(json.dumps({"out": args.out, **result}))


def evaluate_videos(args: argparse.Namespace) -> None:
    from cvg.io.files import check_writable, write_text_atomic
    from cvg_research.compshapes.evaluate import evaluate

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
