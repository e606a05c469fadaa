"""The judge on renders built to pass and to fail: each verdict, and whether it failed on drawing or composition."""

import numpy as np
import pytest

from cvg.guidance.composition import Composition
from cvg_research.compshapes.judge import BLOB, COMPOSITION, DRAWING, detect, judge
from cvg_research.compshapes.world import BACKGROUND, COLOURS, Scene, Thing, render

FRAMES = 17


def _clip(*things: Thing) -> np.ndarray:
    return render(Scene(things, frames=FRAMES))


def _track(shape: str, colour: str, xs, y: float = 32.0) -> np.ndarray:
    """One object at x = xs[t] in frame t (any path, not only the world's straight lines)."""
    return np.stack([render(Scene((Thing(shape, colour, float(x), y, 7.0),), frames=1))[0] for x in xs])


def test_attribute_fails_when_the_swapped_binding_is_drawn_too():
    red_cube, blue_ball = Thing("square", "red", 16, 20, 7), Thing("circle", "blue", 46, 44, 7)
    asked = Composition.parse("crimson box and azure sphere")  # paraphrased colour and shape words
    assert judge(_clip(red_cube, blue_ball), asked).ok
    verdict = judge(_clip(red_cube, blue_ball, Thing("square", "blue", 46, 16, 7)), asked)
    assert (verdict.ok, verdict.failure) == (False, COMPOSITION) and "blue square" in verdict.reason
    verdict = judge(_clip(Thing("square", "blue", 16, 20, 7), Thing("circle", "red", 46, 44, 7)), asked)
    assert (verdict.ok, verdict.failure) == (False, DRAWING) and "no red square" in verdict.reason


def test_spatial_failures_say_drawing_or_composition():
    left, right = Thing("triangle", "green", 16, 32, 7), Thing("diamond", "pink", 48, 30, 7)
    asked = Composition.parse("green pyramid left of pink rhombus")
    assert judge(_clip(left, right), asked).ok
    swapped = _clip(Thing("triangle", "green", 48, 32, 7), Thing("diamond", "pink", 16, 30, 7))
    assert judge(swapped, asked).failure == COMPOSITION
    assert judge(_clip(left), asked).failure == DRAWING
    assert judge(_clip(left, Thing("circle", "pink", 48, 30, 7)), asked).failure == DRAWING  # the wrong shape


def test_motion_is_read_from_the_whole_track():
    asked = Composition.parse("orange cross moves right")
    steady = np.linspace(14, 46, FRAMES)
    assert judge(_track("cross", "orange", steady), asked).ok
    # Right all the way, then one frame drawn back at the start: two points would say it never moved.
    assert judge(_track("cross", "orange", [*steady[:-1], 14.0]), asked).ok
    # Out and back: first and last frames 30 px apart only by their end points; the fit sees no travel.
    there_and_back = [*np.linspace(14, 50, 9), *np.linspace(46, 16, 7), 46.0]
    verdict = judge(_track("cross", "orange", there_and_back), asked)
    assert (verdict.ok, verdict.failure) == (False, COMPOSITION), verdict
    assert judge(_track("cross", "orange", steady[::-1]), asked).failure == COMPOSITION
    assert judge(_track("cross", "cyan", steady), asked).failure == DRAWING


def test_counts_fail_on_composition_when_drawn_and_on_drawing_when_not():
    cubes = [Thing("square", "yellow", x, y, 6) for x, y in ((14, 14), (48, 16), (30, 46))]
    assert judge(_clip(*cubes), Composition.parse("three golden cubes")).ok
    assert judge(_clip(*cubes), Composition.parse("two yellow cubes")).failure == COMPOSITION
    assert judge(_clip(*cubes), Composition.parse("two yellow balls")).failure == DRAWING


def test_a_smear_is_no_shape():
    ys, xs = np.mgrid[0:64, 0:64]
    alpha = np.exp(-((xs - 32) ** 2 / 60 + (ys - 30) ** 2 / 12))[..., None]  # a soft, wide streak
    frame = (np.asarray(BACKGROUND) * (1 - alpha) + np.asarray(COLOURS["red"]) * alpha + 0.5).astype(np.uint8)
    (found,) = detect(frame)
    assert (found.colour, found.shape) == ("red", BLOB)
    assert judge(np.stack([frame] * FRAMES), Composition.parse("red ball")).failure == DRAWING


def test_a_clip_of_no_frames_is_an_error():
    with pytest.raises(ValueError, match="0 frames"):
        judge(np.zeros((0, 64, 64, 3), np.uint8), Composition.parse("red cube"))
