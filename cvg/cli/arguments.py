"""Argument types of the command line (numbers range-checked before any work, one-line errors), and
flags made from config dataclasses: each field's default and help are written once, in the config."""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING

from cvg.request import declared


def ints(text: str, count: int | None = None, low: int = 0) -> list[int]:
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


def number(kind: type, low: float | None = None, high: float | None = None):
    """An argparse type: an int or a finite float within [low, high], else a one-line error naming the range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


POSITIVE, COUNT = number(int, 1), number(int, 0)
SEED = number(int, 0, 2**63 - 1)
STEPS = number(int, 1, 1000)  # the schedulers' training timesteps
TEXT_TOKENS = number(int, 1, 512)  # Wan's text length
FINITE, NON_NEGATIVE = number(float), number(float, 0)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, like every other cvg error (argparse would print the usage first)."""
        self.exit(2, f"cvg: error: {message} (see {self.prog} --help)\n")


def pool_factors(text: str) -> tuple[int, int, int]:
    """One pooling factor for all three axes or one each (frames,height,width)."""
    values = ints(text, 3, low=1)
    return tuple(values * 3 if len(values) == 1 else values)


def config_flags(parser: argparse.ArgumentParser, config: type, flags: dict[str, dict]) -> None:
    """A flag for each field of the dataclass `config` named in `flags`, its type, bounds, choices, default and
    help read from the field's declaration (`cvg.request.documented`). `flags[name]` adds argparse options or
    replaces derived ones: aliases under "names", a command's own "default", a "type"."""
    for name, spec in declared(config).items():
        if name not in flags:
            continue
        options = dict(flags[name])
        names = options.pop("names", [f"--{name.replace('_', '-')}"])
        value = options.pop("default", spec["default"])
        if value is MISSING:
            options["required"], value = True, None
        elif "help" not in options and value is not None:  # None's meaning is in the help
            shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            shown = f"{value:g}" if isinstance(value, float) else shown
            options["help"] = f"{spec['help']} (default {shown})"
        options.setdefault("help", spec["help"])
        if spec["kind"] is bool:
            options.setdefault("action", argparse.BooleanOptionalAction)
        elif spec["choices"] is not None:
            options.setdefault("choices", spec["choices"])
        elif spec["kind"] in (int, float):
            options.setdefault("type", number(spec["kind"], spec["low"], spec["high"]))
        parser.add_argument(*names, dest=name, default=value, **options)


def config_from(args: argparse.Namespace, config: type, flags: dict[str, dict], **given):
    """The dataclass built by keyword from the flags `config_flags(parser, config, flags)` made, and `given`."""
    return config(**{name: getattr(args, name) for name in flags}, **given)


def given_fields(args: argparse.Namespace, flags: dict[str, dict]) -> dict:
    """The flags of `flags` that were given (not None), by field name: a request's settings a command passes on."""
    return {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
