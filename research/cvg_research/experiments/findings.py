"""The paper's findings measured on CompShapes: guidance by the dual-inversion classifier against the rest.

    python -m cvg_research.experiments.findings --model models/compshapes-wan --classifier models/compshapes-classifier

Every row generates the same prompts of one sealed split (`grammar.split_of`: --split dev, where settings
are chosen, or --split test, run only to report a choice already made; the four compositional categories
in turn, spec seed 20261124 unless --spec-seed) with the same noise (seed = --noise-seed + clip id), 20
steps, CFG 5, the guidance settings of `GuidanceConfig` (or --guidance); the CompShapes judge scores them
(95% intervals clustered by prompt; paired rows by sign flips over prompts), the Fréchet distance of a
label-free autoencoder's features to fresh renders and the artefact rates measure quality. Rows (choose
with --rows):
  unguided      the generator alone
  cvg           CVG: the guidance settings (objective terms and window: guide_steps or guide_sigma)
  classifier    the classifier's gradient alone (no training-free centroid term), the settings' window
  cvg-1, cvg-2, cvg-4  the first 1, 2 or 4 steps
  cvg-all       every step
  single        the classifier trained without dual inversion (readings under the true prompt only)
  training-free the objectives that need no training (presence, centroid relation, centroid motion)
  transfer      label transfer: the classifier trained without the clips of `grammar.NOVEL_COMPOSITIONS`
                (`label-transfer`), guiding only the prompts that state one; with it every row is also
                judged on those prompts alone, in a table of its own
Generated sets are kept under WORK per model and row, so a run resumes and rows can be added later.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import time
from dataclasses import asdict, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch

from cvg import threads
from cvg.guidance.classifier import CONFIG_NAME, WEIGHTS_NAME, label_of
from cvg.guidance.composition import Composition
from cvg.guidance.config import GuidanceConfig
from cvg.measure import machine_line, publish
from cvg.models import PRECISIONS
from cvg.models.wan import load_wan_pipeline, model_key
from cvg.pipeline import CVGPipeline
from cvg.request import PipelineOptions
from cvg.runtime import STEP_BACKENDS
from cvg_research.compshapes.dataset import read_index, write_dataset, write_index
from cvg_research.compshapes.evaluate import evaluate
from cvg_research.compshapes.grammar import NOVEL_COMPOSITIONS, novel_composition
from cvg_research.compshapes.stats import cluster_bootstrap_interval, sign_flip_test
from cvg_research.compshapes.videoset import generate_set
from cvg_research.experiments.generator import SPEC_SEED, drawing_table, table
from cvg_research.training.dual_inversion import GUIDED_CATEGORIES, LABEL_TRANSFER, SINGLE_READING

ROWS = ("unguided", "cvg", "classifier", "cvg-1", "cvg-2", "cvg-4", "cvg-all", "single", "training-free", "transfer")
WINDOWS = {"unguided": 0, "cvg-1": 1, "cvg-2": 2, "cvg-4": 4}  # guided steps; cvg-all: all; the rest: --guidance


def _window(row: str, steps: int) -> int | None:
    """The row's own number of guided steps, or None for the window of the guidance settings."""
    return steps if row == "cvg-all" else WINDOWS.get(row)


def _describe_window(config: GuidanceConfig) -> str:
    if config.guide_sigma is not None:
        return f"steps at sigma >= {config.guide_sigma:g}"
    return f"first {config.guide_steps} step{'s' * (config.guide_steps > 1)}"


def row_name(row: str, steps: int, config: GuidanceConfig) -> str:
    window = _describe_window(config)
    return {
        "unguided": "unguided",
        "cvg": f"CVG, {window} (the settings' window)",
        "classifier": f"classifier alone, {window}",
        "cvg-all": "CVG, all steps",
        "single": f"CVG without dual inversion, {window}",
        "training-free": f"training-free objectives, {window}",
        "transfer": f"label transfer: compositions never trained on, {window}",
    }.get(row) or f"CVG, {_describe_window(replace(config, guide_sigma=None, guide_steps=_window(row, steps)))}"


def row_pipeline(row: str, base, args: argparse.Namespace) -> tuple[CVGPipeline, int | None, str]:
    """The pipeline, guide_steps (None: the settings' window) and output folder name of a row: the
    `--guidance` settings (by default `GuidanceConfig`'s) but for the row's window. The folder names a
    digest of those settings and of the classifier's weights, so changed defaults or a retrained classifier
    never reuse another row's clips."""
    guide_steps = _window(row, args.steps)
    config = args.guidance if guide_steps is None else replace(args.guidance, guide_steps=guide_steps, guide_sigma=None)
    config = replace(config, geometric=False) if row == "classifier" else config
    pipe = CVGPipeline(
        base, guidance=config, options=PipelineOptions(step_backend=args.engine, batch_cfg=args.batch_cfg)
    )
    if row == "unguided":
        return pipe, guide_steps, row
    digest = hashlib.sha256(repr(config).encode())
    if row != "training-free":
        directory = Path(args.classifier) / {"single": SINGLE_READING, "transfer": LABEL_TRANSFER}.get(row, "")
        pipe.load_classifier(directory)
        digest.update(b"".join((directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)))
    return pipe, guide_steps, f"{row}-{digest.hexdigest()[:16]}"


def guidance_settings(text: str) -> GuidanceConfig:
    """`GuidanceConfig` from "key=value,..." over its defaults (values as Python literals, or bare strings)."""
    fields, settings = {f.name: f for f in dataclass_fields(GuidanceConfig)}, {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    config = replace(GuidanceConfig(), **settings)
    try:
        config.check(num_inference_steps=10**6)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return config


def paired(results: dict[str, dict], base: str) -> str:
    """Each row against `base` on the same clips (same prompts, same noise): how many clips it turns right
    and wrong, the difference in points with a 95% interval and a sign-flip p, both clustered by prompt."""
    lines = [
        f"| row | right where {base} is wrong | wrong where {base} is right | difference (points) | p (sign flips) |",
        "|---|---|---|---|---|",
    ]
    before = {v["file"]: v for v in results[base]["verdicts"]}
    for name, report in results.items():
        if name == base:
            continue
        pairs = [(before[v["file"]], v) for v in report["verdicts"] if v["file"] in before]
        a, b = (np.array([pair[i]["ok"] for pair in pairs], np.float64) for i in (0, 1))
        prompts = [v["prompt"] for _, v in pairs]
        low, high = cluster_bootstrap_interval(b - a, prompts)
        gained, lost = int(((b - a) > 0).sum()), int(((b - a) < 0).sum())
        difference = f"{100 * (b - a).mean():+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"
        lines.append(f"| {name} | {gained} | {lost} | {difference} | {sign_flip_test(a, b, prompts):.2g} |")
    return "\n".join(lines)


def novel_specs(specs: Path, clips: int) -> tuple[Path, set[int]]:
    """A copy (beside `specs`) of those of its first `clips` records that state a novel composition
    (`grammar.NOVEL_COMPOSITIONS`), and their ids: the prompts of the transfer row."""
    records = [
        r
        for r in read_index(specs)[:clips]
        if novel_composition(r["category"], label_of(Composition.from_dict(r["composition"])))
    ]
    if len(records) < 2:  # a Fréchet distance needs two clips
        raise SystemExit(
            f"{len(records)} of the first {clips} prompts state a novel composition; "
            "the transfer row needs at least 2 (more --clips)"
        )
    out = specs.with_name(f"{specs.name}-novel")
    out.mkdir(parents=True, exist_ok=True)
    write_index(out, records)
    return out, {r["id"] for r in records}


def _novel_compositions() -> str:
    """`grammar.NOVEL_COMPOSITIONS` in words: "attribute: red and green; spatial: blue with above or ..."."""
    return "; ".join(
        f"{category}: {' and '.join(colours)}" + (f" with {' or '.join(phrases)}" if phrases else "")
        for category, (colours, phrases) in NOVEL_COMPOSITIONS.items()
    )


def comparisons(results: dict[str, dict], unguided: str, cvg: str) -> str:
    """The rows paired with the unguided row (does guidance help?), then the guides with the CVG row (does
    it beat them?), where those rows ran."""
    pairs = ""
    if unguided in results and len(results) > 1:
        pairs += f"Paired with the unguided row:\n\n{paired(results, unguided)}\n\n"
    guides = {name: report for name, report in results.items() if name != unguided}
    if cvg in guides and len(guides) > 1:
        pairs += f"Paired with the CVG row:\n\n{paired(guides, cvg)}\n\n"
    return pairs


def main(argv: list[str] | None = None) -> None:
    threads.configure()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/compshapes-wan", help="the generator directory")
    parser.add_argument("--classifier", default="models/compshapes-classifier", help="cvg train-classifier output")
    parser.add_argument("--clips", type=int, default=400, help="held-out clips, categories in turn (default 400)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows to run (default all: {','.join(ROWS)})")
    parser.add_argument(
        "--split",
        choices=("dev", "test"),
        default="dev",
        help="the sealed split whose prompts are generated: dev (choosing settings; the default) or test "
        "(reporting a choice already made)",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument(
        "--guidance",
        type=guidance_settings,
        default=GuidanceConfig(),
        metavar="KEY=VALUE,...",
        help="GuidanceConfig fields other than the defaults, e.g. strength=0.2,iterations=3 "
        "(each row's window still sets guide_steps)",
    )
    parser.add_argument("--spec-seed", type=int, default=SPEC_SEED, help=f"seed of the prompts (default {SPEC_SEED})")
    parser.add_argument("--noise-seed", type=int, default=0, help="clip i's noise seed is this + i (default 0)")
    parser.add_argument("--dtype", choices=PRECISIONS, default="float32", help="the transformer's (default float32)")
    parser.add_argument("--batch-cfg", action="store_true", help="conditional and unconditional forwards in one batch")
    parser.add_argument("--engine", choices=(*STEP_BACKENDS, "auto"), help="step engine of the unguided steps")
    parser.add_argument("--work", type=Path, default=Path(".cache/experiments/findings"), help="working directory")
    parser.add_argument("--write", type=Path, help="record the table in this Markdown file")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    started = time.perf_counter()
    base = load_wan_pipeline(args.model, transformer_dtype=getattr(torch, args.dtype))
    base.set_progress_bar_config(disable=True)
    suffix = f"-{args.split}" + (f"-spec{args.spec_seed}" if args.spec_seed != SPEC_SEED else "")
    specs = args.work / f"specs{suffix}"
    write_dataset(specs, args.clips, args.spec_seed, GUIDED_CATEGORIES, split=args.split)
    noise = f"-noise{args.noise_seed}" if args.noise_seed else ""
    # The transformer's key names its precision (its weights as loaded); batching and engines change
    # the clips within rounding, so their clips are kept apart too.
    execution = "-batch-cfg" * args.batch_cfg + (f"-{args.engine}" if args.engine else "")
    work = args.work / f"{model_key(base.vae)}-{model_key(base.transformer)}{suffix}{noise}{execution}"
    novel_dir, novel_ids = novel_specs(specs, args.clips) if "transfer" in rows else (None, None)
    results, on_novel, seconds = {}, {}, {}
    for row in rows:
        pipe, guide_steps, folder = row_pipeline(row, base, args)
        transfer = row == "transfer"
        sampled = generate_set(
            pipe,
            novel_dir if transfer else specs,
            work / folder,
            seed=args.noise_seed,
            guide_steps=guide_steps,
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            limit=None if transfer else args.clips,
        )
        # A folder may hold more clips from a bigger run: judge only the first --clips.
        name = row_name(row, args.steps, args.guidance)
        if not transfer:
            results[name] = evaluate(work / folder, limit=args.clips)
        if novel_ids:
            on_novel[name] = evaluate(work / folder, ids=novel_ids)
        seconds[row] = sampled["seconds_per_clip"]
        print(f"{row}: done ({sampled['generated']} clips generated now)", flush=True)
    prompts = f"{args.split}-split clips (prompts of compositions no training set holds)"
    changed = {k: v for k, v in asdict(args.guidance).items() if getattr(GuidanceConfig(), k) != v}
    options = f" --guidance {','.join(f'{k}={v}' for k, v in changed.items())}" if changed else ""
    options += f" --split {args.split}"
    options += f" --spec-seed {args.spec_seed} --noise-seed {args.noise_seed}"
    options += f" --dtype {args.dtype}" * (args.dtype != "float32") + " --batch-cfg" * args.batch_cfg
    options += f" --engine {args.engine}" if args.engine else ""
    unguided, cvg = (row_name(r, args.steps, args.guidance) for r in ("unguided", "cvg"))
    pairs = comparisons(results, unguided, cvg)
    if novel_ids:
        pairs += (
            f"The {len(novel_ids)} of these prompts that state a composition the label-transfer head never trained "
            f"on ({_novel_compositions()}), every row judged on them alone:\n\n"
            f"{table(on_novel)}\n\n{comparisons(on_novel, unguided, cvg)}"
        )
    timing = ", ".join(f"{r} {s:.2f} s" for r, s in seconds.items() if s is not None)
    text = (
        f"Command: `python -m cvg_research.experiments.findings --model {args.model} --classifier {args.classifier} "
        f"--clips {args.clips} --rows {','.join(rows)}{options}`\n\n"
        f"{machine_line()}. {args.clips} {prompts}, {', '.join(GUIDED_CATEGORIES)} in turn (spec seed "
        f"{args.spec_seed}; noise seed = {args.noise_seed} + clip id, the same in every row), {args.steps} steps, "
        f"CFG 5; guidance: {args.guidance} but for each row's window; accuracy with 95% intervals clustered by "
        f"prompt; Fréchet distance of a label-free autoencoder's clip features to fresh renders; artefact rates.\n\n"
        f"{table(results)}\n\nDrawn (every entity there, right colour and shape) / composed right when drawn:\n\n"
        f"{drawing_table(results)}\n\n{pairs}"
        f"Seconds per clip (median, rows generated in this run): {timing or 'all reused'}. "
        f"This run took {time.perf_counter() - started:.0f} s."
    )
    publish(text, args.write, "findings")


if __name__ == "__main__":
    main()
