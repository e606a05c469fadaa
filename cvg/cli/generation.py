"""`cvg generate`, `cvg export` and `cvg make-tiny-model`: videos from a model, engines ahead of serving, and a
random tiny model to try them on."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from cvg.cli.arguments import (
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    TEXT_TOKENS,
    config_flags,
    config_from,
    given_fields,
    ints,
    number,
    pool_factors,
)
from cvg.guidance.composition import KINDS
from cvg.guidance.config import NORMALIZATIONS, GuidanceConfig
from cvg.request import PRECISIONS, GenerationRequest, PipelineOptions

# The flags of generate (and of cvg-research's sample), by the field they set: GenerationRequest's (a
# request's settings), PipelineOptions' (how the model is loaded and runs) and GuidanceConfig's (the guidance a
# request overrides).
PROMPT_FLAGS = {"prompt": {}, "composition": {}, "negative_prompt": {}, "seed": {}}
SIZE_FLAGS = {
    "height": {"type": POSITIVE},
    "width": {"type": POSITIVE},
    "num_frames": {"names": ["--num-frames", "--frames"], "metavar": "N"},
}
SETTING_FLAGS = {
    "num_inference_steps": {"names": ["--num-inference-steps", "--steps"], "metavar": "N"},
    "guidance_scale": {},
    "guidance_scale_2": {},
    "guide_steps": {},
    "guidance_strength": {"names": ["--guidance-strength", "--strength"]},
    "iterations": {},
    "max_sequence_length": {},
}
OPTION_FLAGS = {
    "transformer_dtype": {
        "names": ["--dtype"],
        "choices": (*PRECISIONS, "auto"),
        "help": "precision of the transformer (default float32); auto: bfloat16 where this machine runs it fast "
        "(a GPU, or a CPU with AMX or avx512_bf16), else float32",
    },
    "vae_dtype": {},
    "step_backend": {"names": ["--step-backend", "--engine"]},
    "backend_cache": {"metavar": "DIR"},
    "batch_cfg": {},
    "first_block_cache": {"metavar": "THRESHOLD"},
    "taylorseer_cache": {"metavar": "INTERVAL"},
    "classifier": {"metavar": "DIR"},
}
GUIDANCE_FLAGS = {
    "candidates": {},
    "recurrence": {},
    "read_sigma": {},
    "geometric": {},
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
    add_model_flags(gen)
    config_flags(gen, GenerationRequest, PROMPT_FLAGS | SIZE_FLAGS)
    gen.add_argument("--out", required=True, help="output: .mp4, .gif, or a folder for PNG frames")
    gen.add_argument("--save-maps", metavar="PNG", help="also draw the pooled maps of each composition entity")
    gen.add_argument(
        "--fps", type=number(int, 1, 240), default=16, help="frames per second of .mp4/.gif output (default 16)"
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bars (loading or denoising)")
    gen.add_argument(
        "--judge",
        nargs="?",
        const="compshapes",
        metavar="NAME",
        help="judge the video against the composition with an installed judge (default compshapes, from cvg-research)",
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

    export = commands.add_parser(
        "export",
        help="build a step engine's cached artefacts ahead of serving",
        description="Export/compile the transformer for one video shape so that "
        "serving starts warm (see cvg.runtime.step_backend).",
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
    config_flags(export, PipelineOptions, {"transformer_dtype": OPTION_FLAGS["transformer_dtype"]})
    export.add_argument("--cache", help="cache directory (default $CVG_CACHE/engines or ~/.cache/cvg/engines)")
    export.set_defaults(run=export_engine)

    tiny = commands.add_parser("make-tiny-model", help="save a random tiny Wan pipeline (real text encoder)")
    tiny.add_argument("directory", help="where to save the pipeline")
    tiny.add_argument("--seed", type=SEED, default=0, help="seed of the random weights (default 0)")
    tiny.set_defaults(run=make_tiny_model)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The model, sampling and guidance flags of `generate` (and of commands that generate, like cvg-research's
    `sample`)."""
    parser.add_argument("--model", required=True, help="local diffusers WanPipeline directory")
    parser.add_argument(
        "--objective",
        choices=("auto", *KINDS),
        default="auto",
        help="guidance objective; auto picks the one for the composition's kind",
    )
    config_flags(parser, PipelineOptions, OPTION_FLAGS)
    config_flags(parser, GenerationRequest, SETTING_FLAGS)
    config_flags(parser, GuidanceConfig, GUIDANCE_FLAGS)


def precision(name: str) -> str:
    """A `--dtype` choice as a torch precision's name: auto is this machine's fast one."""
    from cvg.hardware import fast_precision

    return fast_precision() if name == "auto" else name


def load_pipeline(args: argparse.Namespace):
    """The CVGPipeline the model flags ask for, and the settings of its calls the flags give."""
    from cvg.guidance.objectives import objective_for
    from cvg.pipeline import CVGPipeline

    options = config_from(args, PipelineOptions, OPTION_FLAGS)
    options = replace(options, transformer_dtype=precision(options.transformer_dtype))
    guidance = config_from(args, GuidanceConfig, GUIDANCE_FLAGS)
    objective = None if args.objective == "auto" else objective_for(args.objective)
    pipe = CVGPipeline.from_pretrained(args.model, objective, options, guidance)
    return pipe, given_fields(args, SETTING_FLAGS)


def generate(args: argparse.Namespace) -> None:
    import torch

    from cvg.guidance.judges import load_judge
    from cvg.io.files import check_writable
    from cvg.io.video import check_output, check_separate, maps_picture, save_frames, save_image

    check_output(args.out)  # before any work: a refused output costs no generation
    check_separate({"--out": args.out, "--save-maps": args.save_maps, "--contact-sheet": args.contact_sheet})
    if args.contact_sheet and not args.compare_seeds:
        raise ValueError("--contact-sheet draws the runs of --compare-seeds N; give --compare-seeds too")
    judge = load_judge(args.judge) if args.judge else None
    for flag, picture in (("--save-maps", args.save_maps), ("--contact-sheet", args.contact_sheet)):
        if picture is not None:
            check_writable(picture, flag)
    if args.quiet:  # loading bars too: stderr then holds only what went wrong
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe, call = load_pipeline(args)
    pipe.pipe.set_progress_bar_config(disable=args.quiet)
    call |= given_fields(args, SIZE_FLAGS)
    out = pipe(
        args.prompt,
        args.composition,
        negative_prompt=args.negative_prompt,
        generator=torch.Generator().manual_seed(args.seed),
        **call,
    )
    written = save_frames(out.frames[0], args.out, fps=args.fps)
    report = {"out": str(written), "objective": [v.tolist() for v in out.objective_values]}
    if args.save_maps:
        if not out.maps:
            raise ValueError("--save-maps needs guidance: give --composition and --guide-steps > 0")
        bound = out.composition
        maps = bound.entity_maps(out.maps[-1].mean(dim=(1, 2)))[0].numpy()  # last guided step; layers, heads averaged
        picture = maps_picture(maps, out.frames[0], list(bound.composition.entities))
        report["maps"] = str(save_image(picture, args.save_maps))
    if judge is not None:
        from cvg.guidance.composition import Composition
        from cvg.io.video import to_uint8

        if not args.composition:
            raise ValueError("--judge needs --composition")
        verdict = judge(to_uint8(out.frames[0]), Composition.parse(args.composition))
        report["verdict"] = {"ok": verdict.ok, "reason": verdict.reason, "failure": verdict.failure}
    if args.compare_seeds:
        from cvg.cli.comparison import compare_seeds

        report["comparison"] = compare_seeds(pipe, call, args, judge)
    print(json.dumps(report))


def export_engine(args: argparse.Namespace) -> None:
    import time

    import torch

    from cvg.pipeline import CVGPipeline
    from cvg.runtime.backends import build_backend
    from cvg.runtime.step_backend import StepShape

    if len(args.shape) != 3:
        raise ValueError(f"--shape must be HEIGHTxWIDTHxFRAMES, got {'x'.join(map(str, args.shape))}")
    height, width, frames = args.shape
    pipe = CVGPipeline.from_pretrained(args.model, transformer_dtype=getattr(torch, precision(args.transformer_dtype)))
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
        engine = build_backend(transformer, StepShape.of(latents, text), args.backend, args.cache)
        report = {
            "expert": name,
            "backend": engine.backend,
            "shape": StepShape.of(latents, text).key(),
            "seconds": round(time.perf_counter() - start, 2),
            "file": str(getattr(engine, "path", "")),
        }
        print(json.dumps(report))


def make_tiny_model(args: argparse.Namespace) -> None:
    from cvg.models.tiny import tiny_wan_pipeline

    directory = Path(args.directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"make-tiny-model: {directory} exists and is not an empty directory; give a new one")
    tiny_wan_pipeline(seed=args.seed).save_pretrained(str(directory))
    print(json.dumps({"model": str(directory)}))
