"""Sampling CompShapes clips with their prompt, composition spec and counterfactuals, and the sealed splits.

Categories, after T2V-CompBench: `attribute` ("a red cube and a blue ball"), `spatial` ("a red cube to
the left of a blue ball"), `motion` ("a green ball moving right") and `numeracy` ("two yellow
triangles"); and `object` ("a red cube"), one object, the baseline any generator must pass. Each clip
comes from its own seed; prompts pick a paraphrase of the relation, of each colour and of each shape's name.
Counterfactuals keep the words and break the composition: relation flipped, colours swapped, direction
reversed, count changed, another colour.

Splits (`split_of`): every prompt belongs to one composition family (`family_key`: the canonical colours,
shapes, axis and, for counts, the colour and shape), and a family belongs to train (60%), dev (20%) or test
(20%) by a stable hash. A family holds a composition, its paraphrases and its counterfactuals, so no wording
or counterfactual of a dev or test composition can reach training. Colours, shapes, relations and the
entities themselves ("a red cube") recur across splits; exact compositions do not.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from cvg.guidance.composition import NUMBERS, Composition
from cvg_research.compshapes.world import (
    COLOUR_WORDS,
    COLOURS,
    PLURALS,
    SHAPE_WORDS,
    SHAPES,
    WORD_TO_COLOUR,
    WORD_TO_SHAPE,
    Scene,
    Thing,
)

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
OBJECT_PHRASES = ("{}", "one {}", "a single {}")  # "{}" takes the article
COUNTS = (2, 3, 4)
SPLITS = ("train", "dev", "test")
_SPLIT_OF_BUCKET = ("train",) * 6 + ("dev",) * 2 + ("test",) * 2  # by crc32 of the family, mod 10
_NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
# Label transfer: whole compositions a label-transfer classifier never trains on, by category: the colours
# its label names and the relation or direction of which it uses one. Each is closed under the clip's
# counterfactual (colours swapped, relation flipped, direction reversed, count changed), so neither
# reading of a held-out clip reaches training.
NOVEL_COMPOSITIONS = {
    "attribute": (("red",), ()),  # red bound with any other colour
    "spatial": (("blue",), (*RELATION_PHRASES["above"], *RELATION_PHRASES["below"])),  # blue, above or below
    "motion": (("yellow",), ("up", "down")),  # a yellow thing moving vertically
    "numeracy": (("red",), ()),  # red things counted
}


class GrammarError(ValueError):
    """A prompt the CompShapes grammar did not write (one-line message naming it)."""


class LeakError(ValueError):
    """A prompt of one sealed split found in a set built for another (one-line message naming it)."""


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
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _entity(rng: np.random.Generator, colour: str, shape: str) -> str:
    return f"{rng.choice(COLOUR_WORDS[colour])} {rng.choice(SHAPE_WORDS[shape])}"


def _reword(entity: str, colour: str) -> str:
    """The entity with its colour word replaced by `colour`'s canonical word (its noun kept)."""
    return f"{colour} {entity.split(' ', 1)[1]}"


def _place(rng, size, frames, height, width, taken, motion="static", distance=0.0, spacing=3.2):
    """A centre inside the frame for the whole clip, `spacing` half-widths away from `taken` centres."""
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}[motion]
    margin = size + 2
    for _ in range(1000):
        x0, y0 = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        x1, y1 = x0 + dx * distance, y0 + dy * distance
        if not (margin <= x1 <= width - margin and margin <= y1 <= height - margin):
            continue
        if all(np.hypot(x0 - x, y0 - y) > spacing * size for x, y in taken):
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
    phrase = str(words.choice(OBJECT_PHRASES))
    prompt = phrase.format(_article(e)) if phrase == "{}" else phrase.format(e)
    split = split_of(prompt)
    counterfactuals = []
    for colour in colours[1:]:  # the same shape in another colour of the same split; none: split_clip draws again
        other = f"{words.choice(COLOUR_WORDS[colour])} {e.split(' ', 1)[1]}"
        wording = phrase.format(_article(other)) if phrase == "{}" else phrase.format(other)
        if split_of(wording) == split:
            counterfactuals.append((wording, Composition("presence", other)))
            break
    return Clip(SINGLE, seed, scene, prompt, Composition("presence", e), tuple(counterfactuals))


def _attribute(rng, words, seed, size, colours, shapes, frames, height, width) -> Clip:
    (c1, c2), (s1, s2) = colours[:2], shapes[:2]
    p1 = _place(rng, size, frames, height, width, [])
    p2 = _place(rng, size, frames, height, width, [p1])
    scene = Scene((Thing(s1, c1, *p1, size), Thing(s2, c2, *p2, size)), frames, height, width)
    e1, e2 = _entity(words, c1, s1), _entity(words, c2, s2)
    comp = Composition("presence", e1, object=e2)
    (k1, w1), (k2, w2) = e1.split(" ", 1), e2.split(" ", 1)  # colour words swap, nouns stay
    swapped = Composition("presence", f"{k2} {w1}", object=f"{k1} {w2}")
    prompt = f"{_article(e1)} and {_article(e2)}"
    counter = f"{_article(swapped.subject)} and {_article(swapped.object)}"
    return Clip("attribute", seed, scene, prompt, comp, ((counter, swapped),))


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
    count = int(rng.choice(COUNTS))
    size *= 1 - 0.1 * (count - 2)  # four objects fit a 64-pixel frame only somewhat smaller and closer
    taken: list = []
    for _ in range(count):
        taken.append(_place(rng, size, frames, height, width, taken, spacing=2.8))
    things = tuple(Thing(shapes[0], colours[0], x, y, size) for x, y in taken)
    scene = Scene(things, frames, height, width)
    noun = PLURALS[str(words.choice(SHAPE_WORDS[shapes[0]]))]
    subject = f"{words.choice(COLOUR_WORDS[colours[0]])} {noun}"
    other = int(words.choice([c for c in COUNTS if c != count]))
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


def _entities(words: list[str]) -> list[str]:
    """The canonical "colour shape" of each entity a grammar prompt names, in order."""
    colours = [WORD_TO_COLOUR[w] for w in words if w in WORD_TO_COLOUR]
    shapes = [WORD_TO_SHAPE[w] for w in words if w in WORD_TO_SHAPE]
    if not 1 <= len(colours) == len(shapes) <= 2:
        raise GrammarError(f"not a CompShapes prompt (one or two coloured shapes): {' '.join(words)!r}")
    return [f"{c} {s}" for c, s in zip(colours, shapes, strict=True)]


def family_key(prompt: str) -> str:
    """The composition family of a grammar prompt: what its paraphrases and counterfactuals share.

    object: colour and shape; attribute: the two colours and the two shapes (either binding); spatial: the
    two entities and the axis (either order, either side); motion: the entity and the axis; numeracy: colour
    and shape (any count)."""
    text = " ".join(prompt.lower().split())
    words = text.split()
    entities = _entities(words)
    axis_of = {"left": "x", "right": "x", "above": "y", "below": "y", "up": "y", "down": "y"}
    if words[0] in ("two", "three", "four", "five"):
        return f"numeracy:{entities[0]}"
    if any(verb in words for verb in MOTION_VERBS):
        return f"motion:{entities[0]}:{axis_of[words[-1]]}"
    for relation, phrases in RELATION_PHRASES.items():
        if len(entities) == 2 and any(f" {p} " in f" {text} " for p in phrases):
            return f"spatial:{'+'.join(sorted(entities))}:{axis_of[relation]}"
    if len(entities) == 2:
        (c1, s1), (c2, s2) = (e.split() for e in entities)
        return f"attribute:{'+'.join(sorted((c1, c2)))}:{'+'.join(sorted((s1, s2)))}"
    return f"object:{entities[0]}"


def split_of(prompt: str) -> str:
    """The sealed split ("train", "dev" or "test") of a grammar prompt: its family's, by a stable hash."""
    return _SPLIT_OF_BUCKET[zlib.crc32(family_key(prompt).encode()) % len(_SPLIT_OF_BUCKET)]


def check_sealed(clip: Clip, split: str = "train") -> Clip:
    """`clip`, or LeakError if its prompt, paraphrases or counterfactual prompts belong to another split than
    `split`. Prompts the grammar did not write belong to no split and pass."""
    for prompt in (clip.prompt, *clip.paraphrases, *(p for p, _ in clip.counterfactuals)):
        try:
            found = split_of(prompt)
        except GrammarError:
            continue
        if found != split:
            raise LeakError(f"{prompt!r} is a {found}-split prompt; it may not reach a {split} set")
    return clip


def sealed(clips: Iterable[Clip], split: str = "train") -> Iterator[Clip]:
    """`clips` through `check_sealed`: the first that leaks another split's prompt raises LeakError."""
    return (check_sealed(clip, split) for clip in clips)


def novel_composition(category: str, label: str) -> bool:
    """Whether a `category` label states one of `NOVEL_COMPOSITIONS` (never in a label-transfer head's training)."""
    if category not in NOVEL_COMPOSITIONS:
        return False
    colours, phrases = NOVEL_COMPOSITIONS[category]
    padded = f" {label.lower()} "
    named = {WORD_TO_COLOUR[w] for w in padded.split() if w in WORD_TO_COLOUR}
    return all(c in named for c in colours) and (not phrases or any(f" {p} " in padded for p in phrases))
