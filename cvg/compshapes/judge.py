"""The CompShapes judge: find the objects in frames by colour, estimate their shapes, positions and
trajectories, and say whether a composition holds, with a reason. No learned parts.

Detection: each pixel takes the palette colour it is nearest to, if nearer than the background and
within `max_colour_distance`; connected regions of one colour are candidates. Within a region, each
pixel's coverage (alpha) is its position between the background and the colour; pixels over half covered
form the object, kept if it has at least `min_area` of them. A 3x3 median filter first removes pixel
noise. Shape from the object's reach from its centroid in 8 directions (see `classify_shape`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cvg.compshapes.world import BACKGROUND, COLOURS, PLURALS, SHAPE_WORDS
from cvg.guidance.composition import Composition, CompositionError

_PALETTE = np.asarray(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)
_WORD_TO_SHAPE = {w: s for s, words in SHAPE_WORDS.items() for w in words}
_WORD_TO_SHAPE |= {PLURALS[w]: s for w, s in list(_WORD_TO_SHAPE.items())}


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    x: float  # centroid, pixels
    y: float
    area: int


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def entity_colour_shape(entity: str) -> tuple[str, str]:
    """'red cube' -> ('red', 'square'); articles and other words are ignored."""
    words = entity.lower().split()
    colours = [w for w in words if w in COLOURS]
    shapes = [_WORD_TO_SHAPE[w] for w in words if w in _WORD_TO_SHAPE]
    if len(colours) != 1 or len(shapes) != 1:
        raise CompositionError(f"CompShapes entities name one colour and one shape, got {entity!r}")
    return colours[0], shapes[0]


_AXES = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.float32)  # x right, y down
_DIAGONALS = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32) / np.sqrt(2)


def classify_shape(xs: np.ndarray, ys: np.ndarray) -> str:
    """Shape of a solid region from how far it reaches from its centroid in 8 directions: a triangle
    (apex up) reaches twice as far up as down; a square reaches sqrt(2) times farther along diagonals."""
    points = np.stack([xs - xs.mean(), ys - ys.mean()], axis=1).astype(np.float32)
    axes = (points @ _AXES.T).max(axis=0)  # right, left, down, up
    diagonals = (points @ _DIAGONALS.T).max(axis=0)
    if axes[3] > 1.3 * axes[2]:
        return "triangle"
    return "square" if diagonals.mean() > 1.18 * axes.mean() else "circle"


def detect(frame: np.ndarray, min_area: int = 12, max_colour_distance: float = 110.0) -> list[Detection]:
    """Objects in one `[H, W, 3]` frame."""
    pixels = ndimage.median_filter(frame, size=(3, 3, 1)).astype(np.float32)  # speckle noise off, edges kept
    distances = np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1)  # [H, W, colours]
    nearest = distances.argmin(-1)
    background = np.linalg.norm(pixels - np.asarray(BACKGROUND, np.float32), axis=-1)
    best = distances.min(-1)
    coloured = (best < background) & (best < max_colour_distance)
    found = []
    for index, name in enumerate(_NAMES):
        colour = _PALETTE[index]
        towards = colour - np.asarray(BACKGROUND, np.float32)
        alpha = ((pixels - np.asarray(BACKGROUND, np.float32)) @ towards) / (towards @ towards)
        labels, _ = ndimage.label(coloured & (nearest == index))
        for number, region in enumerate(ndimage.find_objects(labels), start=1):
            solid = (labels[region] == number) & (alpha[region] > 0.5)
            area = int(solid.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(solid)
            x, y = region[1].start + xs.mean() + 0.5, region[0].start + ys.mean() + 0.5
            found.append(Detection(name, classify_shape(xs, ys), float(x), float(y), area))
    return found


def _matches(detections: list[Detection], colour: str, shape: str) -> list[Detection]:
    return [d for d in detections if d.colour == colour and d.shape == shape]


def judge(frames: np.ndarray, composition: Composition, min_fraction: float = 0.5) -> Verdict:
    """Does `composition` hold in `frames` (`[F, H, W, 3]` uint8)?"""
    return judge_detections([detect(f) for f in frames], frames.shape[1:3], composition, min_fraction)


def judge_detections(
    per_frame: list[list[Detection]], size: tuple[int, int], composition: Composition, min_fraction: float = 0.5
) -> Verdict:
    """`judge` on detections made once per clip (`size` is the frames' (height, width))."""
    frames_count = len(per_frame)
    entities = [entity_colour_shape(e) for e in composition.entities]

    def present(colour, shape):
        return [_matches(d, colour, shape) for d in per_frame]

    for colour, shape in entities:
        seen = sum(bool(m) for m in present(colour, shape))
        if seen < min_fraction * frames_count:
            return Verdict(False, f"no {colour} {shape} in {frames_count - seen} of {frames_count} frames")

    kind = composition.kind
    if kind == "presence" and composition.count is not None:
        counts = [len(m) for m in present(*entities[0])]
        majority = int(np.bincount(counts).argmax())
        ok = majority == composition.count
        return Verdict(ok, f"{majority} {entities[0][0]} {entities[0][1]}s in most frames, {composition.count} asked")
    if kind == "presence":
        return Verdict(True, "every entity is present")

    axis, sign = composition.axis_sign
    if kind == "spatial":
        offsets = []
        for subj, obj in zip(present(*entities[0]), present(*entities[1]), strict=True):
            if subj and obj:
                a, b = max(subj, key=lambda d: d.area), max(obj, key=lambda d: d.area)
                offsets.append(sign * ((a.x - b.x) if axis == 0 else (a.y - b.y)))
        if len(offsets) < min_fraction * frames_count:
            return Verdict(False, "subject and object are seen together in too few frames")
        holds = sum(o > 2.0 for o in offsets)
        return Verdict(holds > len(offsets) / 2, f"relation holds in {holds} of {len(offsets)} frames")

    track = [max(m, key=lambda d: d.area) for m in present(*entities[0]) if m]
    along = [(d.x if axis == 0 else d.y) for d in track]
    across = [(d.y if axis == 0 else d.x) for d in track]
    travel, drift = sign * (along[-1] - along[0]), abs(across[-1] - across[0])
    span = size[1] if axis == 0 else size[0]
    ok = travel > 0.15 * span and travel > drift
    return Verdict(ok, f"travelled {travel:.1f} px the asked way (drift {drift:.1f} px)")
