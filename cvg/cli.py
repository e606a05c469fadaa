"""The `cvg` command line.

    cvg generate --model DIR --prompt "a red cube to the left of a blue ball" \\
                 --composition "red cube left of blue ball" --out out.mp4 --save-maps maps.png
    cvg compshapes-dataset --out DIR --count 2000    # render CompShapes clips with their compositions
    cvg sample --model DIR --specs DATASET --out DIR # generate one clip per record, for `cvg eval`
    cvg train-generator --out DIR                    # train the CompShapes Wan generator on this CPU
    cvg export --model DIR --shape 64x64x17          # build a step engine (ONNX Runtime, ...) ahead of serving
    cvg eval --videos DIR                            # judge clips against their compositions
    cvg make-tiny-model DIR     # a random tiny Wan pipeline with a real text encoder, for trying things out
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from cvg.composition import KINDS, CompositionError
from cvg.compshapes.dataset import SPLITS
from cvg.compshapes.grammar import CATEGORIES, SINGLE
from cvg.dual_inversion import ReadingConfig, TrainingConfig
from cvg.engine import EngineError
from cvg.sampler import NORMALIZATIONS, GuidanceConfig


def _ints(text: str, count: int | None = None, low: int = 0) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text[:80]!r}") from None
    if not values or (count is not None and len(values) not in (1, count)):
        expected = "1 or more" if count is None else f"1 or {count}"
        raise argparse.ArgumentTypeError(f"expected {expected} comma-separated integers, got {text[:80]!r}")
    if min(values) < low:
        raise argparse.ArgumentTypeError(f"every value must be at least {low}, got {text[:80]!r}")
    return values


def _number(kind: type, low: float | None = None, high: float | None = None):
    """An argparse type: an int or a finite float within [low, high], else a one-line error naming the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None  # fmt: skip
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


POSITIVE, COUNT = _number(int, 1), _number(int, 0)
SEED = _number(int, 0, 2**63 - 1)
STEPS = _number(int, 1, 1000)  # the schedulers' training timesteps
TEXT_TOKENS = _number(int, 1, 512)  # Wan's text length
FINITE, NON_NEGATIVE = _number(float), _number(float, 0)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other cvg error (argparse would print the usage first)."""
        self.exit(2, f"cvg: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cvg", description="Compositional guidance for text-to-video diffusion.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate a video with compositional guidance",
                              description="Generate a video with a local diffusers Wan pipeline, guided toward a "
                                          "composition in the first denoising steps.")  # fmt: skip
    _model_flags(gen)
    gen.add_argument("--prompt", required=True, help="the text prompt")
    gen.add_argument("--composition", help='what must hold: "red cube left of blue ball", "ball moves right", '
                     '"red cube and blue ball", or a JSON object; omit for unguided generation')  # fmt: skip
    gen.add_argument("--out", required=True, help="output: .mp4, .gif, or a folder for PNG frames")
    gen.add_argument("--save-maps", metavar="PNG", help="also draw the pooled maps of each composition entity")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt for classifier-free guidance")
    gen.add_argument("--height", type=POSITIVE, help="video height in pixels (default: the size a cvg-trained "
                     "model was trained at, else 480)")  # fmt: skip
    gen.add_argument("--width", type=POSITIVE, help="video width in pixels (default: as --height, else 832)")
    gen.add_argument("--frames", type=POSITIVE, help="video frames, 4k+1 (default: as --height, else 81)")
    gen.add_argument("--seed", type=SEED, default=0, help="seed of the initial noise (default 0)")
    gen.add_argument("--fps", type=_number(int, 1, 240), default=16,
                     help="frames per second of .mp4/.gif output (default 16)")  # fmt: skip
    gen.add_argument("--quiet", action="store_true", help="no progress bars (loading or denoising)")
    gen.add_argument("--judge", action="store_true",
                     help="judge the video against the composition with the CompShapes judge")  # fmt: skip
    gen.add_argument("--compare-seeds", type=_number(int, 0, 1000), default=0, metavar="N",
                     help="also generate seeds SEED..SEED+N-1 unguided and guided, judge each (with --judge) "
                          "and print the two counts")  # fmt: skip
    gen.add_argument("--contact-sheet", metavar="PNG",
                     help="with --compare-seeds: every run side by side, frames across, in one picture")  # fmt: skip

    sample = commands.add_parser(
        "sample", help="generate one clip per record of a spec set (resumable)",
        description="Generate a video set for `cvg eval`: one clip per record of a dataset index, at each "
                    "record's scene size, with seed SEED + id.",
    )  # fmt: skip
    _model_flags(sample)
    sample.add_argument("--specs", required=True, help="dataset directory or index JSONL with prompts and compositions")
    sample.add_argument("--out", required=True, help="output directory (index.jsonl + clips/)")
    sample.add_argument("--limit", type=COUNT, help="only the first LIMIT records")
    sample.add_argument("--seed", type=SEED, default=0, help="base seed; record i uses SEED + i (default 0)")

    export = commands.add_parser("export", help="build a step engine's cached artefacts ahead of serving",
                                 description="Export/compile the transformer for one video shape so that "
                                             "serving starts warm (see cvg.engine).")  # fmt: skip
    export.add_argument("--model", required=True, help="local diffusers WanPipeline directory")
    export.add_argument("--shape", required=True, type=lambda t: _ints(t.replace("x", ","), 3, low=1),
                        help="HEIGHTxWIDTHxFRAMES of the video, e.g. 64x64x17")  # fmt: skip
    export.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt", "compiled"), default="auto",
                        help="engine backend (default auto)")  # fmt: skip
    export.add_argument("--batch", type=_number(int, 1, 64), default=1, help="videos per call (default 1)")
    export.add_argument("--max-sequence-length", type=TEXT_TOKENS, default=512, help="text tokens (default 512)")
    export.add_argument("--cache", help="cache directory (default $CVG_CACHE/engines or ~/.cache/cvg/engines)")

    train_gen = commands.add_parser("train-generator", help="train the CompShapes Wan generator here (resumable)")
    train_gen.add_argument("--out", required=True, help="directory for the WanPipeline (checkpoints in OUT/.work)")
    train_gen.add_argument("--seed", type=SEED, default=0, help="seed of data, initialisation and noise (default 0)")
    train_gen.add_argument("--vae-steps", type=COUNT, help="VAE training steps (default: the shipped recipe's)")
    train_gen.add_argument("--steps", type=COUNT, help="transformer training steps (default: the shipped recipe's)")
    train_gen.add_argument("--clips", type=POSITIVE, help="clips encoded for the transformer (default: the recipe's)")

    data = commands.add_parser("compshapes-dataset", help="render a CompShapes dataset (resumable)")
    data.add_argument("--out", required=True, help="dataset directory (index.jsonl + clips/)")
    data.add_argument("--count", type=COUNT, required=True, help="number of clips; categories take turns")
    data.add_argument("--seed", type=SEED, default=0, help="dataset seed (default 0)")
    data.add_argument("--frames", type=POSITIVE, default=17, help="frames per clip (default 17)")
    data.add_argument("--size", type=_number(int, 8, 4096), default=64,
                      help="clip height and width in pixels (default 64)")  # fmt: skip
    data.add_argument(
        "--categories",
        type=lambda t: tuple(t.split(",")),
        default=CATEGORIES,
        help=f"comma-separated, taking turns (default {','.join(CATEGORIES)}; also {SINGLE})",
    )
    data.add_argument("--split", choices=SPLITS, default="all",
                      help="prompts: all, only training ones, or only the held-out fifth (default all)")  # fmt: skip

    evaluation = commands.add_parser("eval", help="judge videos against their compositions (CompShapes)")
    evaluation.add_argument("--videos", required=True, help="directory holding the clips (.npz frames or videos)")
    evaluation.add_argument("--specs", help="index JSONL (file, prompt, composition, ...); default VIDEOS/index.jsonl")
    evaluation.add_argument("--json", help="also write the full report (with failures) here")
    evaluation.add_argument("--reference", help="dataset of renders for the Fréchet distance (default: fresh renders)")
    evaluation.add_argument("--no-quality", action="store_true", help="skip the Fréchet distance and artefact rates")

    encoder = commands.add_parser("train-encoder", help="train the CompShapes clip encoder for the Fréchet score")
    encoder.add_argument("--out", required=True, help="directory for model.safetensors + config.json")
    encoder.add_argument("--clips", type=POSITIVE, default=1600, help="training renders (default 1600)")
    encoder.add_argument("--epochs", type=POSITIVE, default=6, help="epochs (default 6)")
    encoder.add_argument("--seed", type=SEED, default=0, help="seed (default 0)")

    train_cls = commands.add_parser(
        "train-classifier", help="train the compositional classifier by dual inversion (resumable)",
        description="Read CompShapes clips with a generator by dual inversion, train the classifier head, and "
                    "measure accuracy and composition leakage on held-out clips, with and without dual inversion.",
    )  # fmt: skip
    train_cls.add_argument("--model", required=True, help="the generator (a local WanPipeline directory)")
    train_cls.add_argument("--out", required=True, help="directory for the classifier (readings cached in OUT/.work)")
    train_cls.add_argument("--clips", type=POSITIVE, default=2000, help="training clips (default 2000)")
    train_cls.add_argument("--heldout", type=COUNT, default=200, help="held-out clips measured (default 200)")
    train_cls.add_argument("--data", metavar="DIR", help="train on this dataset folder (index.jsonl + clips/, "
                           "e.g. from cvg compshapes-dataset) instead of fresh CompShapes renders")  # fmt: skip
    train_cls.add_argument("--heldout-data", metavar="DIR", help="measure on this dataset folder instead")
    train_cls.add_argument("--seed", type=SEED, default=0, help="seed of clips and initialisation (default 0)")
    train_cls.add_argument("--steps", type=STEPS, default=20, help="sampling steps whose guided steps are read")
    train_cls.add_argument("--guide-steps", type=POSITIVE, default=ReadingConfig.guide_steps,
                           help=f"first steps read, where guidance may act (default {ReadingConfig.guide_steps})")
    train_cls.add_argument("--chunk", type=POSITIVE, default=25,
                           help="clips per cached file of readings: the most a killed run loses (default 25)")
    train_cls.add_argument("--readings", choices=("trajectory", "inversion"), default=ReadingConfig.source,
                           help="read the generator's own samples along its sampling trajectory, labelled by the "
                                "judge (default), or clips inverted to the guided steps' noise levels")
    train_cls.add_argument("--epochs", type=POSITIVE, default=TrainingConfig.epochs,
                           help=f"epochs of the head (default {TrainingConfig.epochs})")  # fmt: skip
    train_cls.add_argument("--hidden-dim", type=POSITIVE, default=TrainingConfig.hidden_dim,
                           help=f"width of the head's two MLPs (default {TrainingConfig.hidden_dim})")  # fmt: skip
    train_cls.add_argument("--weight-decay", type=NON_NEGATIVE, default=TrainingConfig.weight_decay,
                           help=f"AdamW weight decay (default {TrainingConfig.weight_decay:g})")  # fmt: skip
    smoothing = TrainingConfig.label_smoothing
    train_cls.add_argument("--label-smoothing", type=_number(float, 0, 0.99), default=smoothing,
                           help=f"label smoothing of the head's targets (default {smoothing:g})")  # fmt: skip

    tiny = commands.add_parser("make-tiny-model", help="save a random tiny Wan pipeline (real text encoder)")
    tiny.add_argument("directory", help="where to save the pipeline")
    tiny.add_argument("--seed", type=SEED, default=0, help="seed of the random weights (default 0)")
    return parser


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The model, sampling and guidance flags `generate` and `sample` share."""
    parser.add_argument("--model", required=True, help="local diffusers WanPipeline directory")
    parser.add_argument("--objective", choices=("auto", *KINDS), default="auto",
                        help="guidance objective; auto picks the one for the composition's kind")  # fmt: skip
    parser.add_argument("--classifier", metavar="DIR",
                        help="guide with a classifier from cvg train-classifier instead")  # fmt: skip
    parser.add_argument("--steps", type=STEPS, default=50, help="denoising steps (default 50)")
    default = GuidanceConfig()
    parser.add_argument("--guide-steps", type=COUNT, default=None,
                        help=f"guided steps at the start (default {default.guide_steps}, or every step of a "
                             f"shorter schedule)")  # fmt: skip
    parser.add_argument("--strength", type=NON_NEGATIVE, default=default.strength,
                        help=f"RMS of each latent update, the largest with --normalize polyak (default "
                             f"{default.strength:g})")  # fmt: skip
    parser.add_argument("--iterations", type=_number(int, 1, 100), default=default.iterations,
                        help=f"at most this many guidance updates per guided step (default {default.iterations})")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default=default.normalize,
                        help=f"step rule: rms / max gradient normalisation, none, or polyak (the first-order step "
                             f"to the target loss) (default {default.normalize})")  # fmt: skip
    parser.add_argument("--target-loss", type=NON_NEGATIVE, default=default.target_loss,
                        help="leave an item alone once its objective is this low (default: the classifier's "
                             "-log confidence; none for the training-free objectives)")  # fmt: skip
    parser.add_argument("--layers", type=_ints, help="blocks whose maps are read, e.g. 0,1,2 (default all)")
    parser.add_argument("--pool", type=lambda t: _ints(t, 3, low=1), default=[1, 2, 2],
                        help="pooling of the frames,height,width token grid (default 1,2,2)")  # fmt: skip
    parser.add_argument("--guidance-scale", type=FINITE, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--max-sequence-length", type=TEXT_TOKENS, default=512, help="text tokens (Wan pads to this)")


def _load(args: argparse.Namespace):
    """The CVGPipeline and the call arguments the model flags ask for."""
    from cvg.objectives import objective_for
    from cvg.pipeline import CVGPipeline

    pool = args.pool * 3 if len(args.pool) == 1 else args.pool
    guidance = replace(GuidanceConfig(), strength=args.strength,
                       iterations=args.iterations, normalize=args.normalize, target_loss=args.target_loss,
                       layers=args.layers, pool=tuple(pool))  # fmt: skip
    objective = None if args.objective == "auto" else objective_for(args.objective)
    pipe = CVGPipeline.from_pretrained(args.model, objective=objective)
    pipe.guidance = guidance
    if args.classifier:
        pipe.load_classifier(args.classifier)
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
            "max_sequence_length": args.max_sequence_length}  # fmt: skip
    if args.guide_steps is not None:  # asked for: checked against the steps, never shortened
        call["guide_steps"] = args.guide_steps
    return pipe, call


def _video_size(args: argparse.Namespace) -> dict[str, int]:
    from cvg.pipeline import video_size

    return video_size(args.model, args.height, args.width, args.frames)


def generate(args: argparse.Namespace) -> None:
    import torch

    from cvg.files import check_writable
    from cvg.video import check_output, maps_picture, save_frames, save_image

    check_output(args.out)  # before any work: a refused output costs no generation
    for flag, picture in (("--save-maps", args.save_maps), ("--contact-sheet", args.contact_sheet)):
        if picture is not None:
            check_writable(picture, flag)
    if args.quiet:  # loading bars too: stderr then holds only what went wrong
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe, call = _load(args)
    pipe.pipe.set_progress_bar_config(disable=args.quiet)
    out = pipe(
        args.prompt, args.composition, negative_prompt=args.negative_prompt, **_video_size(args),
        generator=torch.Generator().manual_seed(args.seed), **call,
    )  # fmt: skip
    written = save_frames(out.frames[0], args.out, fps=args.fps)
    report = {"out": str(written), "objective": [v.tolist() for v in out.objective_values]}
    if args.save_maps:
        if not out.maps:
            raise ValueError("--save-maps needs guidance: give --composition and --guide-steps > 0")
        bound = out.composition
        maps = bound.entity_maps(out.maps[-1].mean(dim=1))[0].numpy()  # last guided step, layers averaged
        picture = maps_picture(maps, out.frames[0], list(bound.composition.entities))
        report["maps"] = str(save_image(picture, args.save_maps))
    if args.judge:
        from cvg.composition import Composition
        from cvg.compshapes.judge import judge
        from cvg.video import to_uint8

        if not args.composition:
            raise ValueError("--judge needs --composition")
        verdict = judge(to_uint8(out.frames[0]), Composition.parse(args.composition))
        report["verdict"] = {"ok": verdict.ok, "reason": verdict.reason}
    if args.compare_seeds:
        report["comparison"] = _compare_seeds(pipe, call, args)
    print(json.dumps(report))


def _compare_seeds(pipe, call: dict, args: argparse.Namespace) -> dict:
    """Seeds SEED..SEED+N-1, each unguided and guided: verdicts (with --judge), counts, a contact sheet."""
    import torch

    from cvg.composition import Composition
    from cvg.compshapes.judge import judge
    from cvg.video import contact_sheet, save_image, to_uint8

    if not args.composition:
        raise ValueError("--compare-seeds needs --composition")
    composition = Composition.parse(args.composition)
    rows, counts, runs = [], {"unguided": 0, "guided": 0}, []
    for seed in range(args.seed, args.seed + args.compare_seeds):
        for name, guide_steps in (("unguided", 0), ("guided", None)):
            out = pipe(args.prompt, args.composition, negative_prompt=args.negative_prompt, **_video_size(args),
                       generator=torch.Generator().manual_seed(seed), guide_steps=guide_steps, **call)  # fmt: skip
            frames = to_uint8(out.frames[0])
            run = {"seed": seed, "run": name}
            if args.judge:
                verdict = judge(frames, composition)
                run.update(ok=verdict.ok, reason=verdict.reason)
                counts[name] += verdict.ok
            print(json.dumps(run), file=sys.stderr)
            runs.append(run)
            mark = "" if not args.judge else (" ok" if run["ok"] else " not ok")
            rows.append((f"seed {seed} {name}{mark}", frames))
    result = {"runs": runs, "seeds": args.compare_seeds}
    if args.judge:
        result["counts"] = counts
        print(f"{args.composition!r}: unguided {counts['unguided']} of {args.compare_seeds} seeds, guided "
              f"{counts['guided']} of {args.compare_seeds}", file=sys.stderr)  # fmt: skip
    if args.contact_sheet:
        result["contact_sheet"] = str(save_image(contact_sheet(rows), args.contact_sheet))
    return result


def sample_set(args: argparse.Namespace) -> None:
    from cvg.files import check_writable
    from cvg.videoset import generate_set

    check_writable(Path(args.out) / "index.jsonl", "--out")
    pipe, call = _load(args)
    result = generate_set(pipe, args.specs, args.out, args.seed, args.limit,
                          report=lambda line: print(line, file=sys.stderr), **call)  # fmt: skip
    print(json.dumps({"out": args.out, **result}))


def export_engine(args: argparse.Namespace) -> None:
    import time

    import torch

    from cvg.engine import StepShape, build_engine
    from cvg.pipeline import load_wan_pipeline

    if len(args.shape) != 3:
        raise ValueError(f"--shape must be HEIGHTxWIDTHxFRAMES, got {'x'.join(map(str, args.shape))}")
    height, width, frames = args.shape
    pipe = load_wan_pipeline(args.model)
    vae, transformer = pipe.vae.config, pipe.transformer
    latents = torch.empty(args.batch, transformer.config.in_channels, (frames - 1) // vae.scale_factor_temporal + 1,
                          height // vae.scale_factor_spatial, width // vae.scale_factor_spatial,
                          dtype=transformer.dtype)  # fmt: skip
    # Zero text: the engine's text_keys is then its smallest (64), which every prompt of under 64 tokens fits.
    text = torch.zeros(args.batch, args.max_sequence_length, transformer.config.text_dim, dtype=transformer.dtype)
    start = time.perf_counter()
    engine = build_engine(transformer, StepShape.of(latents, text), args.backend, args.cache)
    print(json.dumps({"backend": engine.backend, "shape": StepShape.of(latents, text).key(),
                      "seconds": round(time.perf_counter() - start, 2),
                      "file": str(getattr(engine, "path", ""))}))  # fmt: skip


def train_generator(args: argparse.Namespace) -> None:
    from cvg.generator import GeneratorRecipe
    from cvg.generator import train_generator as train

    sizes = {"vae_steps": args.vae_steps, "steps": args.steps, "clips": args.clips}
    recipe = GeneratorRecipe(seed=args.seed, **{k: v for k, v in sizes.items() if v is not None})
    manifest = train(args.out, recipe, report=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"model": args.out, "timings": manifest["timings"]}))


def train_classifier(args: argparse.Namespace) -> None:
    from cvg.dual_inversion import train_and_evaluate

    reading = ReadingConfig(source=args.readings, num_inference_steps=args.steps, guide_steps=args.guide_steps)
    training = TrainingConfig(epochs=args.epochs, label_smoothing=args.label_smoothing, seed=args.seed,
                              hidden_dim=args.hidden_dim, weight_decay=args.weight_decay)  # fmt: skip
    summary = train_and_evaluate(args.model, args.out, args.clips, args.heldout, args.seed, reading, training,
                                 lambda line: print(line, file=sys.stderr), args.data, args.heldout_data,
                                 args.chunk)  # fmt: skip
    print(json.dumps({"classifier": args.out, "heldout": summary["heldout_results"]}))


def make_tiny_model(args: argparse.Namespace) -> None:
    from cvg.tiny import tiny_wan_pipeline

    directory = Path(args.directory)
    tiny_wan_pipeline(seed=args.seed).save_pretrained(str(directory))
    print(json.dumps({"model": str(directory)}))


def compshapes_dataset(args: argparse.Namespace) -> None:
    from cvg.compshapes.dataset import write_dataset

    written = write_dataset(args.out, args.count, args.seed, args.categories, args.frames, args.size, args.size,
                            args.split)  # fmt: skip
    print(json.dumps({"dataset": args.out, "written": written, "count": args.count}))


def evaluate_videos(args: argparse.Namespace) -> None:
    from cvg.compshapes.evaluate import evaluate
    from cvg.files import check_writable, write_text_atomic

    if args.json:
        check_writable(args.json, "--json")
    report = evaluate(args.videos, args.specs, args.reference, quality=not args.no_quality)
    for category, entry in report["categories"].items():
        low, high = entry["ci95"]
        line = (
            f"{category:<10} accuracy {entry['accuracy']:.3f}  95% CI [{low:.3f}, {high:.3f}]  clips {entry['clips']}"
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


def train_encoder(args: argparse.Namespace) -> None:
    from cvg.compshapes.quality import train_encoder as train

    config = train(args.out, args.clips, args.epochs, args.seed)
    print(json.dumps({"encoder": args.out, "log": config["log"]}))


COMMANDS = {
    "generate": generate,
    "sample": sample_set,
    "export": export_engine,
    "train-generator": train_generator,
    "train-classifier": train_classifier,
    "compshapes-dataset": compshapes_dataset,
    "eval": evaluate_videos,
    "train-encoder": train_encoder,
    "make-tiny-model": make_tiny_model,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError, FloatingPointError, CompositionError, EngineError) as e:
        print(f"cvg: error: {' '.join(str(e).split())[:500]}", file=sys.stderr)  # one line, whatever raised it
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
