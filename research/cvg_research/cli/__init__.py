"""cvg-research's commands, added to `cvg`'s command line by the `cvg.commands` entry point."""

from __future__ import annotations

import argparse

from cvg_research.cli import data, training


def add_parsers(commands: argparse._SubParsersAction) -> None:
    for group in (data, training):
        group.add_parsers(commands)
