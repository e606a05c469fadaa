"""Sampling CompShapes clips with their prompt, composition spec and counterfactuals.

Categories, after T2V-CompBench: `attribute` ("a red cube and a blue ball"), `spatial` ("a red cube to
the left of a blue ball"), `motion` ("a green ball moving right") and `numeracy` ("two yellow
triangles"); and `object` ("a red cube"), one object, the baseline any generator must pass. Each clip
comes from its own seed; prompts pick a paraphrase of the relation and of each shape's name.
Counterfactuals keep the words and break the composition: relation flipped, colours swapped, direction
reversed, count changed, another colour.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np

from cvg.compshapes.world import COLOURS, PLURALS, SHAPE_WORDS, SHAPES, Scene, Thing
from cvg.guidance.composition import NUMBERS, Composition

CATEGORIES = ("attribute", "spatial", "motion", "numeracy")  # the compositional ones, after T2V-CompBench
SINGLE = "object"  # one static object ("a red cube"): does a generator draw what it is told at all?
ALL_CATEGORIES = (SINGLE, *CATEGORIES)
RELATION_PHRASES = {
    "left": ("to the left of", "left of", "on the left side of"),
    "right": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "on top of"),
    "below": ("below", "under", "beneath"),
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "up": "down", "down": "up"}
MOTION_VERBS = ("moving", "moves", "travelling")
_NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
# Label transfer: whole compositions a label-transfer classifier never trains on, by category: the colours
# its label names and the relation or direction of which it uses one. Each is closed under the clip's
# counterfactual (colours swapped, relation flipped, direction reversed, count changed), so neither
# reading of a held-out clip reaches training.
NOVEL_COMPOSITIONS = {
    "attribute": (("red", "green"), ()),  # red and green bound together
    "spatial": (("blue",), (*RELATION_PHRASES["above"], *RELATION_PHRASES["below"])),  # blue, above or below
    "motion": (("yellow",), ("up", "down")),  # a yellow thing moving vertically
    "numeracy": (("red",), ()),  # red things counted
}


@dataclass(frozen=True)
class Clip:
    category: str
    seed: int
    scene: Scene
    prompt: str
    composition: Composition
    counterfactuals: tuple[tuple[str, Composition], ...]  # (prompt, composition) pairs that do not hold
    paraphrases: tuple[str, ...] = ()  # other wordings of the same prompt

    def to_record(self) -> dict:
        return {
            "category": self.category,
            "seed": self.seed,
            "prompt": self.prompt,
            "composition": self.composition.to_dict(),
            "counterfactuals": [{"prompt": p, "composition": c.to_dict()} for p, c in self.counterfactuals],
            "paraphrases": list(self.paraphrases),
            "scene": self.scene.to_dict(),
        }

    @classmethod
    def from_record(cls, record: dict) -> Clip:
        return cls(
            record["category"],
            record["seed"],
            Scene.from_dict(record["scene"]),
            record["prompt"],
            Composition.from_dict(record["composition"]),
            tuple((c["prompt"], Composition.from_dict(c["composition"])) for c in record["counterfactuals"]),
            tuple(record.get("paraphrases", ())),
        )


def _article(phrase: str) -> str:
    return f"a {phrase}"


def _entity(rng: np.random.Generator, colour: str, shape: str) -> str:
    return f"{colour} {rng.choice(SHAPE_WORDS[shape])}"


def _place(rng, size, frames, height, width, taken, motion="static", distance=0.0):
    """A centre inside the frame for the whole clip, away from `taken` centres."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}[motion]
    margin = size + 2
    for _ in range(1000):
        x0, y0 = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        x1, y1 = x0 + dx * distance, y0 + dy * distance
        if not (margin <= x1 <= width - margin and margin <= y1 <= height - margin):
            continue
        if all(np.hypot(x0 - x, y0 - y) > 3.2 * size for x, y in taken):
            return x0, y0
    raise RuntimeError("could not place an object; the clip is too small for its objects")


def sample_clip(
    seed: int, category: str, frames: int = 17, height: int = 64, width: int = 64, paraphrases: int = 3
) -> Clip:
    """One clip of `category`, fully determined by `seed`, with up to `paraphrases` other wordings."""
    if category not in ALL_CATEGORIES:
        raise ValueError(f"category must be one of {', '.join(ALL_CATEGORIES)}, got {category!r}")
    builders = {SINGLE: _object, "attribute": _attribute, "spatial": _spatial, "motion": _motion}
    build = {**builders, "numeracy": _numeracy}[category]

    def variant(wording: int) -> Clip:
        # Layout and wording draw from separate streams: a paraphrase is the same clip in other words.
        rng, words = np.random.default_rng(seed), np.random.default_rng([seed, wording])
        size = float(rng.uniform(6.0, 8.0)) * min(height, width) / 64  # half-width; smaller circles rasterise square
        colours = [str(c) for c in rng.permutation(list(COLOURS))]
        shapes = [str(s) for s in rng.permutation(SHAPES)]
        return build(rng, words, seed, size, colours, shapes, frames, height, width)

    clip = variant(0)
    others = []
    for wording in range(1, 4 * paraphrases + 1):  # a few tries: some wordings coincide
        prompt = variant(wording).prompt
        if prompt != clip.prompt and prompt not in others and len(others) < paraphrases:
            others.append(prompt)
    return replace(clip, paraphrases=tuple(others))


def _object(rng, words, seed, size, colours, shapes, frames, height, width) -> Clip:
    p = _place(rng, size, frames, height, width, [])
    scene = Scene((Thing(shapes[0], colours[0], *p, size),), frames, height, width)
    e = _entity(words, colours[0], shapes[0])
    other = f"{colours[1]} {e.split(' ', 1)[1]}"  # same shape, another colour
    return Clip(
        SINGLE,
        seed,
        scene,
        _article(e),
        Composition("presence", e),
        ((_article(other), Composition("presence", other)),),
    )


def held_out(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out fifth that generators and classifiers never train on.

    The split is by prompt text (a stable hash), so a held-out prompt is unseen in any layout."""
    return zlib.crc32(prompt.encode()) % 5 == 0


def _attribute(rng, words, seed, size, colours, shapes, frames, height, width) -> Clip:
    (c1, c2), (s1, s2) = colours[:2], shapes[:2]
    p1 = _place(rng, size, frames, height, width, [])
    p2 = _place(rng, size, frames, height, width, [p1])
    scene = Scene((Thing(s1, c1, *p1, size), Thing(s2, c2, *p2, size)), frames, height, width)
    e1, e2 = _entity(words, c1, s1), _entity(words, c2, s2)
    comp = Composition("presence", e1, object=e2)
    w1, w2 = e1.split(" ", 1)[1], e2.split(" ", 1)[1]
    swapped = Composition("presence", f"{c2} {w1}", object=f"{c1} {w2}")
    prompt = f"{_article(e1)} and {_article(e2)}"
    return Clip("attribute", seed, scene, prompt, comp, ((f"a {c2} {w1} and a {c1} {w2}", swapped),))


def _spatial(rng, words, seed, size, colours, shapes, frames, height, width) -> Clip:
    (c1, c2), (s1, s2) = colours[:2], shapes[:2]
    relation = str(rng.choice(list(RELATION_PHRASES)))
    horizontal = relation in ("left", "right")
    gap = float(rng.uniform(3.5 * size, 0.5 * (width if horizontal else height)))
    along = float(rng.uniform(size + 2 + gap / 2, (width if horizontal else height) - size - 2 - gap / 2))
    across = float(rng.uniform(size + 2, (height if horizontal else width) - size - 2))
    limit = (height if horizontal else width) - size - 2
    shifted = float(np.clip(across + rng.uniform(-size, size), size + 2, limit))  # stays inside the frame
    sign = -1 if relation in ("left", "above") else 1  # subject before the object along the axis
    a, b = along + sign * gap / 2, along - sign * gap / 2
    p1, p2 = ((a, across), (b, shifted)) if horizontal else ((across, a), (shifted, b))
    scene = Scene((Thing(s1, c1, *p1, size), Thing(s2, c2, *p2, size)), frames, height, width)
    e1, e2 = _entity(words, c1, s1), _entity(words, c2, s2)
    phrase = str(words.choice(RELATION_PHRASES[relation]))
    flipped = str(words.choice(RELATION_PHRASES[OPPOSITE[relation]]))
    comp = Composition("spatial", e1, relation=phrase, object=e2)
    counter = Composition("spatial", e1, relation=flipped, object=e2)
    prompt = f"{_article(e1)} {phrase} {_article(e2)}"
    return Clip("spatial", seed, scene, prompt, comp, ((f"{_article(e1)} {flipped} {_article(e2)}", counter),))


def _motion(rng, words, seed, size, colours, shapes, frames, height, width) -> Clip:
    direction = str(rng.choice(["left", "right", "up", "down"]))
    span = width if direction in ("left", "right") else height
    distance = float(rng.uniform(0.35, 0.6) * span)
    p = _place(rng, size, frames, height, width, [], direction, distance)
    scene = Scene((Thing(shapes[0], colours[0], *p, size, direction, distance),), frames, height, width)
    e = _entity(words, colours[0], shapes[0])
    verb = str(words.choice(MOTION_VERBS))
    comp = Composition("motion", e, direction=direction)
    counter = Composition("motion", e, direction=OPPOSITE[direction])
    return Clip(
        "motion",
        seed,
        scene,
        f"{_article(e)} {verb} {direction}",
        comp,
        ((f"{_article(e)} {verb} {OPPOSITE[direction]}", counter),),
    )


def _numeracy(rng, words, seed, size, colours, shapes, frames, height, width) -> Clip:
    count = int(rng.integers(2, 4))
    taken: list = []
    for _ in range(count):
        taken.append(_place(rng, size, frames, height, width, taken))
    things = tuple(Thing(shapes[0], colours[0], x, y, size) for x, y in taken)
    scene = Scene(things, frames, height, width)
    noun = PLURALS[str(words.choice(SHAPE_WORDS[shapes[0]]))]
    subject = f"{colours[0]} {noun}"
    other = 5 - count  # 2 <-> 3
    comp = Composition("presence", subject, count=count)
    counter = Composition("presence", subject, count=other)
    return Clip(
        "numeracy",
        seed,
        scene,
        f"{_NUMBER_WORDS[count]} {subject}",
        comp,
        ((f"{_NUMBER_WORDS[other]} {subject}", counter),),
    )


def novel_composition(category: str, label: str) -> bool:
    """Whether a `category` label states one of `NOVEL_COMPOSITIONS` (never in a label-transfer head's training)."""
    if category not in NOVEL_COMPOSITIONS:
        return False
    colours, phrases = NOVEL_COMPOSITIONS[category]
    padded = f" {label} "
    return all(f" {c} " in padded for c in colours) and (not phrases or any(f" {p} " in padded for p in phrases))
