"""Judges: whether a generated video shows a composition, with a reason.

The library says what a judge is (`Judge`, `Verdict`); judges come from installed packages, registered under
the entry-point group `cvg.judges` (a name, and a callable `judge(frames, composition) -> Verdict`).
cvg-research (`research/` in this repository) registers `compshapes`, the CompShapes world's judge, which
`cvg generate --judge` uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

import numpy as np

from cvg.guidance.composition import Composition

GROUP = "cvg.judges"
DRAWING, COMPOSITION = "drawing", "composition"  # what a failed verdict failed on


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    failure: str | None = None  # DRAWING (an entity missing) or COMPOSITION (all drawn, composed wrong) when not ok


class Judge(Protocol):
    def __call__(self, frames: np.ndarray, composition: Composition) -> Verdict:
        """Judge uint8 frames `[F, H, W, 3]` against `composition`."""
        ...


def installed_judges() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def load_judge(name: str) -> Judge:
    """The installed judge called `name`; a one-line error naming what is installed otherwise."""
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        have = ", ".join(installed_judges()) or "none"
        raise ValueError(
            f"no judge {name!r} is installed (installed: {have}); the CompShapes judge comes with cvg-research: "
            "pip install -e research"
        )
    return found[0].load()
