"""The `cvg` command line.

    cvg generate --model DIR --prompt "a red cube to the left of a blue ball" \\
                 --composition "red cube left of blue ball" --out out.mp4 --save-maps maps.png
    cvg export --model DIR --shape 64x64x17          # build a step engine (ONNX Runtime, ...) ahead of serving
    cvg make-tiny-model DIR     # a random tiny Wan pipeline with a real text encoder, for trying things out
    cvg serve --model DIR --port 8000                # video jobs over HTTP: POST /v1/videos, poll, fetch

Installed packages add commands through the `cvg.commands` entry point (a callable given the subparsers);
cvg-research (`research/`) adds the measurement bed's:

    cvg compshapes-dataset --out DIR --count 2000    # render CompShapes clips with their compositions
    cvg sample --model DIR --specs DATASET --out DIR # generate one clip per record, for `cvg eval`
    cvg eval --videos DIR                            # judge clips against their compositions
    cvg train-generator --out DIR                    # train the CompShapes Wan generator on this CPU
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from cvg import threads
from cvg.cli import generation, serving
from cvg.cli.arguments import Parser
from cvg.guidance.composition import CompositionError
from cvg.runtime import BackendError

COMMANDS = "cvg.commands"  # entry-point group of packages that add commands


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags; building it imports nothing heavy (`cvg --help` answers at once)."""
    parser = Parser(prog="cvg", description="Compositional guidance for text-to-video diffusion.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (generation, serving):
        group.add_parsers(commands)
    for plugin in entry_points(group=COMMANDS):
        plugin.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    threads.configure()  # before any command loads torch
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, FloatingPointError, CompositionError, BackendError) as e:
        print(f"cvg: error: {' '.join(str(e).split())[:500]}", file=sys.stderr)  # one line, whatever raised it
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
