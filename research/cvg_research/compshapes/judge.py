"""The CompShapes judge: find the objects in frames by colour, name their shapes, positions and tracks,
and say whether a composition holds, with a reason and, for a failure, whether it failed on drawing (an
entity of the prompt missing) or on the composition (everything drawn, arranged, bound, moved or counted
wrong). No learned parts.

Detection: each pixel is read as a blend of the background and one palette colour, the one whose blend
line passes nearest (within `max_colour_distance`); its coverage (alpha) is how far along that line it
lies. An object is a connected part of the pixels of one colour covered over half, kept if it has at least
`min_area` of them. Colours are read after a 3x3 median filter, which removes pixel noise.

Shape: every CompShapes shape fills the box around its centre edge to edge, so the object's box gives a
centre and a size, and the shape is the one whose outline there overlaps the object best
(intersection over union, searched over half-pixel shifts); below `MIN_SHAPE_IOU`, or in a box far from
square, the object is a "blob", no shape at all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cvg.guidance.composition import Composition, CompositionError
from cvg.guidance.judges import COMPOSITION, DRAWING, Verdict
from cvg_research.compshapes.world import BACKGROUND, COLOURS, SHAPES, WORD_TO_COLOUR, WORD_TO_SHAPE, shape_mask

_BACKGROUND = np.asarray(BACKGROUND, np.float32)
_TOWARDS = np.asarray(list(COLOURS.values()), np.float32) - _BACKGROUND  # [colours, 3]
_NAMES = list(COLOURS)
BLOB = "blob"  # an object no shape's outline fits
MIN_SHAPE_IOU = 0.6
MAX_ASPECT = 1.35  # a box longer than this on one side holds no CompShapes shape


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    x: float  # centroid, pixels
    y: float
    area: int


def entity_colour_shape(entity: str) -> tuple[str, str]:
    """'red cube' -> ('red', 'square'), 'crimson balls' -> ('red', 'circle'); articles and other words are
    ignored."""
    words = entity.lower().split()
    colours = [WORD_TO_COLOUR[w] for w in words if w in WORD_TO_COLOUR]
    shapes = [WORD_TO_SHAPE[w] for w in words if w in WORD_TO_SHAPE]
    if len(colours) != 1 or len(shapes) != 1:
        raise CompositionError(f"CompShapes entities name one colour and one shape, got {entity!r}")
    return colours[0], shapes[0]


# Half-pixel shifts of the outline's centre and size, searched at once: each [27, 1, 1].
_DX, _DY, _DR = np.array(list(itertools.product((-0.5, 0.0, 0.5), repeat=3))).T[..., None, None]


def classify_shape(solid: np.ndarray) -> str:
    """The shape whose outline best overlaps a solid region (bool [h, w], its box cut tight), or BLOB."""
    ys, xs = np.nonzero(solid)
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    if max(width, height) > MAX_ASPECT * min(width, height):  # every shape's box is square
        return BLOB
    pad = 2
    grid = np.pad(solid, pad)
    gy, gx = np.mgrid[0 : grid.shape[0], 0 : grid.shape[1]] + 0.5
    cx, cy = (xs.min() + xs.max() + 1) / 2 + pad, (ys.min() + ys.max() + 1) / 2 + pad
    size = max(width, height) / 2
    best, best_iou = BLOB, MIN_SHAPE_IOU
    for shape in SHAPES:  # every shift at once: [shifts, h, w]
        outline = shape_mask(shape, gx - cx - _DX, gy - cy - _DY, size + _DR)
        iou = ((outline & grid).sum((1, 2)) / np.maximum((outline | grid).sum((1, 2)), 1)).max()
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def detect(frame: np.ndarray, min_area: int = 12, max_colour_distance: float = 60.0) -> list[Detection]:
    """Objects in one `[H, W, 3]` frame."""
    # Each pixel is read as a blend of the background and one palette colour (an anti-aliased edge is one):
    # its colour is the palette entry whose blend line passes nearest, its coverage (alpha) how far along.
    # Colours are read after a 3x3 median filter (speckle noise off); coverage, which gives the outline,
    # before it (the filter would round a thin cross's arms off).
    pixels = ndimage.median_filter(frame, size=(3, 3, 1)).astype(np.float32)
    alpha, distances = _blend(pixels)
    nearest = distances.argmin(-1)
    coloured = (distances.min(-1) < max_colour_distance) & (alpha.max(-1) > 0.1)
    alpha = _blend(frame.astype(np.float32))[0]
    found = []
    for index, name in enumerate(_NAMES):
        # Objects are the connected parts of the over-half-covered pixels: two shapes a pixel apart, whose
        # blended edges touch, stay two.
        labels, _ = ndimage.label(coloured & (nearest == index) & (alpha[..., index] > 0.5))
        for number, region in enumerate(ndimage.find_objects(labels), start=1):
            solid = labels[region] == number
            area = int(solid.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(solid)
            x, y = region[1].start + xs.mean() + 0.5, region[0].start + ys.mean() + 0.5
            tight = solid[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            found.append(Detection(name, classify_shape(tight), float(x), float(y), area))
    return found


def _blend(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel and palette colour: coverage along the background-to-colour line, and distance from it."""
    offset = pixels - _BACKGROUND  # [H, W, 3]
    along, length = offset @ _TOWARDS.T, (_TOWARDS**2).sum(1)  # [H, W, colours], [colours]
    alpha = np.clip(along / length, 0, 1)
    squared = (offset**2).sum(-1, keepdims=True) - 2 * alpha * along + alpha**2 * length  # |offset - alpha T|^2
    return alpha, np.sqrt(np.maximum(squared, 0))


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
    if frames_count == 0:
        raise ValueError("a clip of 0 frames cannot be judged")
    entities = [entity_colour_shape(e) for e in composition.entities]

    def present(colour, shape):
        return [_matches(d, colour, shape) for d in per_frame]

    def seen_in(colour, shape) -> int:
        return sum(bool(m) for m in present(colour, shape))

    for colour, shape in entities:
        seen = seen_in(colour, shape)
        if seen < min_fraction * frames_count:
            reason = f"no {colour} {shape} in {frames_count - seen} of {frames_count} frames"
            return Verdict(False, reason, DRAWING)

    kind = composition.kind
    if kind == "presence" and composition.count is not None:
        counts = [len(m) for m in present(*entities[0])]
        majority = int(np.bincount(counts).argmax())
        ok = majority == composition.count
        reason = f"{majority} {entities[0][0]} {entities[0][1]}s in most frames, {composition.count} asked"
        return Verdict(ok, reason, None if ok else COMPOSITION)
    if kind == "presence":
        if len(entities) == 2:  # the swapped binding drawn too: the colours are not bound to their nouns
            (c1, s1), (c2, s2) = entities
            for colour, shape in ((c2, s1), (c1, s2)):
                if (c1, s1) != (colour, shape) != (c2, s2) and seen_in(colour, shape) >= min_fraction * frames_count:
                    return Verdict(False, f"a {colour} {shape} is drawn too (the other entity's colour)", COMPOSITION)
        return Verdict(True, "every entity is present")

    axis, sign = composition.axis_sign
    if kind == "spatial":
        offsets = []
        for subj, obj in zip(present(*entities[0]), present(*entities[1]), strict=True):
            if subj and obj:
                a, b = max(subj, key=lambda d: d.area), max(obj, key=lambda d: d.area)
                offsets.append(sign * ((a.x - b.x) if axis == 0 else (a.y - b.y)))
        if len(offsets) < min_fraction * frames_count:
            return Verdict(False, "subject and object are seen together in too few frames", DRAWING)
        holds = sum(o > 2.0 for o in offsets)
        ok = holds > len(offsets) / 2
        return Verdict(ok, f"relation holds in {holds} of {len(offsets)} frames", None if ok else COMPOSITION)
    return _judge_track(present(*entities[0]), size, axis, sign)


def _judge_track(found: list[list[Detection]], size: tuple[int, int], axis: int, sign: int) -> Verdict:
    """Motion from the whole track: least-squares lines of position over time along and across the axis;
    the fitted travel the asked way must pass 15% of the frame and the fitted drift across it."""
    times = np.asarray([t for t, m in enumerate(found) if m], np.float64)
    if len(times) < 2:
        return Verdict(False, "seen in fewer than 2 frames: no motion to measure", DRAWING)
    track = [max(m, key=lambda d: d.area) for m in found if m]
    along = np.asarray([(d.x if axis == 0 else d.y) for d in track])
    across = np.asarray([(d.y if axis == 0 else d.x) for d in track])
    duration = len(found) - 1
    travel = sign * np.polyfit(times, along, 1)[0] * duration
    drift = abs(np.polyfit(times, across, 1)[0]) * duration
    span = size[1] if axis == 0 else size[0]
    ok = bool(travel > 0.15 * span and travel > drift)
    return Verdict(ok, f"travelled {travel:.1f} px the asked way (drift {drift:.1f} px)", None if ok else COMPOSITION)
