"""`cvg train-generator`, `cvg train-classifier` and `cvg train-encoder`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from cvg.cli.arguments import COUNT, NON_NEGATIVE, POSITIVE, SEED, STEPS, config_flags, config_from, number
from cvg_research.training.config import ReadingConfig, TrainingConfig

# ReadingConfig and TrainingConfig fields that are flags of train-classifier (the seed is the command's).
READING_FLAGS = {
    "source": {"names": ["--readings"]},
    "num_inference_steps": {"names": ["--num-inference-steps", "--steps"], "type": STEPS, "metavar": "N"},
    "guide_steps": {"type": POSITIVE},
}
TRAINING_FLAGS = {
    "epochs": {"type": POSITIVE},
    "hidden_dim": {"type": POSITIVE},
    "weight_decay": {"type": NON_NEGATIVE},
    "label_smoothing": {"type": number(float, 0, 0.99)},
    "objective": {},
    "channels": {},
    "per_head": {},
    "aggregator": {},
}


def add_parsers(commands: argparse._SubParsersAction) -> None:
    train_gen = commands.add_parser("train-generator", help="train the CompShapes Wan generator here (resumable)")
    train_gen.add_argument("--out", required=True, help="directory for the WanPipeline (checkpoints in OUT/.work)")
    train_gen.add_argument(
        "--recipe",
        metavar="FILE",
        help="a GeneratorRecipe as JSON (e.g. training/generator-v5/recipe.json); the flags below override it",
    )
    train_gen.add_argument("--seed", type=SEED, help="seed of data, initialisation and noise (default: the recipe's)")
    train_gen.add_argument("--vae-steps", type=COUNT, help="VAE training steps (default: the shipped recipe's)")
    train_gen.add_argument("--steps", type=COUNT, help="transformer training steps (default: the shipped recipe's)")
    train_gen.add_argument("--clips", type=POSITIVE, help="clips encoded for the transformer (default: the recipe's)")
    train_gen.add_argument(
        "--snapshot",
        metavar="DIR",
        help="train nothing: save the run in --out as it stands (its transformer's last checkpoint) to DIR",
    )
    train_gen.set_defaults(run=train_generator)

    train_cls = commands.add_parser(
        "train-classifier",
        help="train the compositional classifier by dual inversion (resumable)",
        description="Read CompShapes clips with a generator by dual inversion, train the classifier head, and "
        "measure accuracy and composition leakage on held-out clips, with and without dual inversion.",
    )
    train_cls.add_argument("--model", required=True, help="the generator (a local WanPipeline directory)")
    train_cls.add_argument("--out", required=True, help="directory for the classifier (readings cached in OUT/.work)")
    train_cls.add_argument("--clips", type=POSITIVE, default=2000, help="training clips (default 2000)")
    train_cls.add_argument("--heldout", type=COUNT, default=200, help="held-out clips measured (default 200)")
    train_cls.add_argument(
        "--data",
        metavar="DIR",
        help="train on this dataset folder (index.jsonl + clips/, "
        "e.g. from cvg compshapes-dataset) instead of fresh CompShapes renders",
    )
    train_cls.add_argument("--heldout-data", metavar="DIR", help="measure on this dataset folder instead")
    train_cls.add_argument("--seed", type=SEED, default=0, help="seed of clips and initialisation (default 0)")
    train_cls.add_argument(
        "--chunk",
        type=POSITIVE,
        default=25,
        help="clips per cached file of readings: the most a killed run loses (default 25)",
    )
    config_flags(train_cls, ReadingConfig, READING_FLAGS)
    config_flags(train_cls, TrainingConfig, TRAINING_FLAGS)
    train_cls.set_defaults(run=train_classifier)

    encoder = commands.add_parser("train-encoder", help="train the CompShapes clip encoder for the Fréchet score")
    encoder.add_argument("--out", required=True, help="directory for model.safetensors + config.json")
    encoder.add_argument("--clips", type=POSITIVE, default=1600, help="training renders (default 1600)")
    encoder.add_argument("--epochs", type=POSITIVE, default=6, help="epochs (default 6)")
    encoder.add_argument("--seed", type=SEED, default=0, help="seed (default 0)")
    encoder.set_defaults(run=train_encoder)


def train_generator(args: argparse.Namespace) -> None:
    from cvg_research.training.generator import snapshot_generator
    from cvg_research.training.generator import train_generator as train
    from cvg_research.training.recipe import GeneratorRecipe

    if args.snapshot:
        manifest = snapshot_generator(args.out, args.snapshot, report=lambda line: print(line, file=sys.stderr))
        print(json.dumps({"model": args.snapshot, "step": manifest["snapshot_step"]}))
        return

    given = {"seed": args.seed, "vae_steps": args.vae_steps, "steps": args.steps, "clips": args.clips}
    base = GeneratorRecipe.from_file(args.recipe) if args.recipe else GeneratorRecipe()
    recipe = replace(base, **{k: v for k, v in given.items() if v is not None})
    manifest = train(args.out, recipe, report=lambda line: print(line, file=sys.stderr))
    print(json.dumps({"model": args.out, "timings": manifest["timings"]}))


def train_classifier(args: argparse.Namespace) -> None:
    from cvg_research.training.dual_inversion import train_and_evaluate

    reading = config_from(args, ReadingConfig, READING_FLAGS)
    training = config_from(args, TrainingConfig, TRAINING_FLAGS, seed=args.seed)
    summary = train_and_evaluate(
        args.model,
        args.out,
        args.clips,
        args.heldout,
        args.seed,
        reading,
        training,
        lambda line: print(line, file=sys.stderr),
        args.data,
        args.heldout_data,
        args.chunk,
    )
    print(json.dumps({"classifier": args.out, "heldout": summary["heldout_results"]}))


def train_encoder(args: argparse.Namespace) -> None:
    from cvg_research.compshapes.quality import train_encoder as train

    config = train(args.out, args.clips, args.epochs, args.seed)
    print(json.dumps({"encoder": args.out, "log": config["log"]}))
