"""`cvg generate`, `cvg sample` and `cvg export`: videos from a model, and engines ahead of serving."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from cvg.cli.arguments import (
    COUNT,
    FINITE,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    STEPS,
    TEXT_TOKENS,
    config_flags,
    config_from,
    ints,
    number,
    pool_factors,
)
from cvg.guidance.composition import KINDS
from cvg.guidance.config import NORMALIZATIONS, GuidanceConfig
from cvg.models import PRECISIONS
from cvg.runtime import STEP_BACKENDS

# GuidanceConfig fields that are flags of generate and sample (guide_steps apart: None there means "the
# configured window, shortened to the schedule").
GUIDANCE_FLAGS = {
    "candidates": {"type": number(int, 1, 64)},
    "geometric": {"action": argparse.BooleanOptionalAction},
    "strength": {"type": NON_NEGATIVE},
    "iterations": {"type": number(int, 1, 100)},
    "normalize": {"choices": NORMALIZATIONS},
    "target_loss": {"type": NON_NEGATIVE},
    "layers": {"type": ints},
    "pool": {"type": pool_factors},
}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    gen = commands.add_parser(
        "generate",
        help="generate a video with compositional guidance",
        description="Generate a video with a local diffusers Wan pipeline, guided toward a "
        "composition in the first denoising steps.",
    )
    _model_flags(gen)
    gen.add_argument("--prompt", required=True, help="the text prompt")
    gen.add_argument(
        "--composition",
        help='what must hold: "red cube left of blue ball", "ball moves right", '
        '"red cube and blue ball", or a JSON object; omit for unguided generation',
    )
    gen.add_argument("--out", required=True, help="output: .mp4, .gif, or a folder for PNG frames")
    gen.add_argument("--save-maps", metavar="PNG", help="also draw the pooled maps of each composition entity")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt for classifier-free guidance")
    gen.add_argument(
        "--height",
        type=POSITIVE,
        help="video height in pixels (default: the size a cvg-trained model was trained at, else 480)",
    )
    gen.add_argument("--width", type=POSITIVE, help="video width in pixels (default: as --height, else 832)")
    gen.add_argument(
        "--num-frames",
        "--frames",
        dest="num_frames",
        metavar="N",
        type=POSITIVE,
        help="video frames, 4k+1 (default: as --height, else 81)",
    )
    gen.add_argument("--seed", type=SEED, default=0, help="seed of the initial noise (default 0)")
    gen.add_argument(
        "--fps", type=number(int, 1, 240), default=16, help="frames per second of .mp4/.gif output (default 16)"
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bars (loading or denoising)")
    gen.add_argument(
        "--judge", action="store_true", help="judge the video against the composition with the CompShapes judge"
    )
    gen.add_argument(
        "--compare-seeds",
        type=number(int, 0, 1000),
        default=0,
        metavar="N",
        help="also generate seeds SEED..SEED+N-1 unguided and guided, judge each (with --judge) "
        "and print the two counts",
    )
    gen.add_argument(
        "--contact-sheet",
        metavar="PNG",
        help="with --compare-seeds: every run side by side, frames across, in one picture",
    )
    gen.set_defaults(run=generate)

    sample = commands.add_parser(
        "sample",
        help="generate one clip per record of a spec set (resumable)",
        description="Generate a video set for `cvg eval`: one clip per record of a dataset index, at each "
        "record's scene size, with seed SEED + id.",
    )
    _model_flags(sample)
    sample.add_argument("--specs", required=True, help="dataset directory or index JSONL with prompts and compositions")
    sample.add_argument("--out", required=True, help="output directory (index.jsonl + clips/)")
    sample.add_argument("--limit", type=COUNT, help="only the first LIMIT records")
    sample.add_argument("--seed", type=SEED, default=0, help="base seed; record i uses SEED + i (default 0)")
    sample.set_defaults(run=sample_set)

    export = commands.add_parser(
        "export",
        help="build a step engine's cached artefacts ahead of serving",
        description="Export/compile the transformer for one video shape so that "
        "serving starts warm (see cvg.runtime.step_engine).",
    )
    export.add_argument("--model", required=True, help="local diffusers WanPipeline directory")
    export.add_argument(
        "--shape",
        required=True,
        type=lambda t: ints(t.replace("x", ","), 3, low=1),
        help="HEIGHTxWIDTHxFRAMES of the video, e.g. 64x64x17",
    )
    export.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt", "compiled"),
        default="auto",
        help="engine backend (default auto)",
    )
    export.add_argument("--batch", type=number(int, 1, 64), default=1, help="videos per call (default 1)")
    export.add_argument("--max-sequence-length", type=TEXT_TOKENS, default=512, help="text tokens (default 512)")
    _dtype_flag(export)
    export.add_argument("--cache", help="cache directory (default $CVG_CACHE/engines or ~/.cache/cvg/engines)")
    export.set_defaults(run=export_engine)


def _model_flags(parser: argparse.ArgumentParser) -> None:
    """The model, sampling and guidance flags `generate` and `sample` share."""
    parser.add_argument("--model", required=True, help="local diffusers WanPipeline directory")
    parser.add_argument(
        "--objective",
        choices=("auto", *KINDS),
        default="auto",
        help="guidance objective; auto picks the one for the composition's kind",
    )
    parser.add_argument("--classifier", metavar="DIR", help="guide with a classifier from cvg train-classifier instead")
    parser.add_argument(
        "--num-inference-steps",
        "--steps",
        dest="num_inference_steps",
        metavar="N",
        type=STEPS,
        default=50,
        help="denoising steps (default 50)",
    )
    guide_steps = next(f for f in fields(GuidanceConfig) if f.name == "guide_steps")
    parser.add_argument(
        "--guide-steps",
        type=COUNT,
        default=None,
        help=f"{guide_steps.metadata['help']} (default {guide_steps.default}, or every step of a shorter schedule)",
    )
    config_flags(parser, GuidanceConfig, GUIDANCE_FLAGS)
    parser.add_argument("--guidance-scale", type=FINITE, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument(
        "--guidance-scale-2",
        type=FINITE,
        default=None,
        help="Wan 2.2 A14B: the low-noise expert's classifier-free guidance scale (default: --guidance-scale)",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=TEXT_TOKENS,
        help="text tokens the prompt is padded to (default: Wan 512, CogVideoX 226)",
    )
    _dtype_flag(parser)
    parser.add_argument(
        "--vae-dtype",
        choices=PRECISIONS,
        default="float32",
        help="precision of the VAE decode, chosen apart from the transformer's: bfloat16 decodes the shipped "
        "model's clips 1.3x faster on this CPU, within 3.4 of 255 levels (default float32)",
    )
    parser.add_argument(
        "--batch-cfg",
        action=argparse.BooleanOptionalAction,
        help="run a step's conditional and unconditional forwards as one batch of two (the same result within "
        "float rounding; faster on this CPU, most in bfloat16: benchmarks/RESULTS.md) (default: as the model's "
        "diffusers pipeline runs them, off for Wan, on for CogVideoX)",
    )
    parser.add_argument(
        "--engine",
        choices=(*STEP_BACKENDS, "auto"),
        help="run the unguided forwards on this step engine (cvg.runtime.step_engine; `compiled` is the fastest "
        "here, benchmarks/RESULTS.md) (default: eager diffusers)",
    )
    parser.add_argument(
        "--first-block-cache",
        type=NON_NEGATIVE,
        metavar="THRESHOLD",
        help="diffusers' FirstBlockCache at this threshold on the unguided steps after the guided ones "
        "(default off; time and verdicts in benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--taylorseer-cache",
        type=POSITIVE,
        metavar="INTERVAL",
        help="diffusers' TaylorSeer on the unguided steps after the guided ones: each block's attentions and "
        "feed-forward computed every INTERVAL steps and predicted between (default off; time and verdicts in "
        "benchmarks/RESULTS.md)",
    )


def _dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=(*PRECISIONS, "auto"),
        default="float32",
        help="precision of the transformer (default float32); auto: bfloat16 where this machine runs it fast "
        "(a GPU, or a CPU with AMX or avx512_bf16), else float32",
    )


def _precision(name: str) -> str:
    from cvg.hardware import fast_precision

    return fast_precision() if name == "auto" else name


def _load(args: argparse.Namespace):
    """The CVGPipeline and the call arguments the model flags ask for."""
    import torch

    from cvg.guidance.objectives import objective_for
    from cvg.pipeline import CVGPipeline

    guidance = config_from(args, GuidanceConfig, GUIDANCE_FLAGS)
    objective = None if args.objective == "auto" else objective_for(args.objective)
    caches = [flag for flag in ("first_block_cache", "taylorseer_cache") if getattr(args, flag) is not None]
    if len(caches) > 1:
        raise ValueError("--first-block-cache and --taylorseer-cache: choose one step cache")
    if args.engine is not None and caches:
        flag = "--" + caches[0].replace("_", "-")
        raise ValueError(f"{flag} runs on eager diffusers forwards; --engine bypasses its hooks")
    pipe = CVGPipeline.from_pretrained(
        args.model,
        objective=objective,
        transformer_dtype=getattr(torch, _precision(args.dtype)),
        vae_dtype=getattr(torch, args.vae_dtype),
    )
    pipe.guidance, pipe.engine = guidance, args.engine
    if args.batch_cfg is not None:
        pipe.batch_cfg = args.batch_cfg
    if args.first_block_cache is not None:
        from diffusers import FirstBlockCacheConfig

        pipe.cache = FirstBlockCacheConfig(threshold=args.first_block_cache)
    if args.taylorseer_cache is not None:
        from diffusers import TaylorSeerCacheConfig

        from cvg.models.caching import WAN_TAYLORSEER_MODULES

        pipe.cache = TaylorSeerCacheConfig(
            cache_interval=args.taylorseer_cache, cache_identifiers=WAN_TAYLORSEER_MODULES
        )
    if args.classifier:
        pipe.load_classifier(args.classifier)
    call = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "max_sequence_length": args.max_sequence_length,
    }
    if args.guide_steps is not None:  # asked for: checked against the steps, never shortened
        call["guide_steps"] = args.guide_steps
    if args.guidance_scale_2 is not None:  # a one-expert pipeline refuses it by name
        call["guidance_scale_2"] = args.guidance_scale_2
    return pipe, call


def _video_size(args: argparse.Namespace) -> dict[str, int]:
    from cvg.models.families import directory_adapter
    from cvg.models.wan import video_size

    default = directory_adapter(args.model).default_size  # the family's: Wan 480x832x81, CogVideoX 480x720x49
    return video_size(args.model, args.height, args.width, args.num_frames, default)


def generate(args: argparse.Namespace) -> None:
    import torch

    from cvg.io.files import check_writable
    from cvg.io.video import check_output, maps_picture, save_frames, save_image

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
        args.prompt,
        args.composition,
        negative_prompt=args.negative_prompt,
        **_video_size(args),
        generator=torch.Generator().manual_seed(args.seed),
        **call,
    )
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
        from cvg.compshapes.judge import judge
        from cvg.guidance.composition import Composition
        from cvg.io.video import to_uint8

        if not args.composition:
            raise ValueError("--judge needs --composition")
        verdict = judge(to_uint8(out.frames[0]), Composition.parse(args.composition))
        report["verdict"] = {"ok": verdict.ok, "reason": verdict.reason, "failure": verdict.failure}
    if args.compare_seeds:
        from cvg.cli.comparison import compare_seeds

        report["comparison"] = compare_seeds(pipe, call, args, _video_size(args))
    print(json.dumps(report))


def sample_set(args: argparse.Namespace) -> None:
    from cvg.compshapes.videoset import generate_set
    from cvg.io.files import check_writable

    check_writable(Path(args.out) / "index.jsonl", "--out")
    pipe, call = _load(args)
    result = generate_set(
        pipe, args.specs, args.out, args.seed, args.limit, report=lambda line: print(line, file=sys.stderr), **call
    )
    print(json.dumps({"out": args.out, **result}))


def export_engine(args: argparse.Namespace) -> None:
    import time

    import torch

    from cvg.pipeline import CVGPipeline
    from cvg.runtime.step_engine import StepShape, build_engine

    if len(args.shape) != 3:
        raise ValueError(f"--shape must be HEIGHTxWIDTHxFRAMES, got {'x'.join(map(str, args.shape))}")
    height, width, frames = args.shape
    pipe = CVGPipeline.from_pretrained(args.model, transformer_dtype=getattr(torch, _precision(args.dtype)))
    vae = pipe.pipe.vae.config
    for name, transformer in pipe.experts.items():  # Wan 2.2 A14B: an engine per expert, a line each
        latents = torch.empty(
            args.batch,
            transformer.config.in_channels,
            (frames - 1) // vae.scale_factor_temporal + 1,
            height // vae.scale_factor_spatial,
            width // vae.scale_factor_spatial,
            dtype=transformer.dtype,
        )
        # Zero text: the engine's text_keys is then its smallest (64), which every prompt of under 64 tokens fits.
        text = torch.zeros(args.batch, args.max_sequence_length, transformer.config.text_dim, dtype=transformer.dtype)
        start = time.perf_counter()
        engine = build_engine(transformer, StepShape.of(latents, text), args.backend, args.cache)
        report = {
            "expert": name,
            "backend": engine.backend,
            "shape": StepShape.of(latents, text).key(),
            "seconds": round(time.perf_counter() - start, 2),
            "file": str(getattr(engine, "path", "")),
        }
        print(json.dumps(report))
