"""What must hold in the video: a small typed composition spec, its text form, and its prompt tokens.

    Composition.parse("red cube left of blue ball")      # spatial
    Composition.parse("ball moves right")                 # motion
    Composition.parse("red cube and blue ball")           # presence (both must appear)
    Composition.parse("two yellow triangles")             # presence with a count
    Composition.parse('{"kind": "spatial", "subject": "red cube", "relation": "left of", "object": "blue ball"}')

`bind(tokenizer, prompt)` finds each entity's words in the prompt and returns their token indices.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cvg.guidance.binding import BoundComposition


KINDS = ("spatial", "motion", "presence")
# Relation phrases (longest first when parsing) and the axis/sign they constrain.
RELATIONS = {
    "on the left side of": "left",
    "to the left of": "left",
    "on the left of": "left",
    "left of": "left",
    "on the right side of": "right",
    "to the right of": "right",
    "on the right of": "right",
    "right of": "right",
    "on top of": "above",
    "above": "above",
    "below": "below",
    "beneath": "below",
    "under": "below",
}
DIRECTIONS = ("left", "right", "up", "down")
# The relation phrase each family member is written with (the label family of a spatial composition).
CANONICAL_RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_MOTION = re.compile(r"^(?P<subject>.+?)\s+(?:moves|moving|goes|going|travels|travelling)\s+(?P<dir>\w+)$")


def _clip(text: str, limit: int = 80) -> str:
    """`repr(text)`, cut short: a 10 KB prompt in an error line would bury the error."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _swap_binding(first: str, second: str) -> tuple[str, str] | None:
    """Two entities with their first words exchanged ("red cube", "blue ball" -> "blue cube", "red ball"), or
    None when either is one word or the exchange names them alike."""
    (a, _, a_rest), (b, _, b_rest) = first.partition(" "), second.partition(" ")
    if not a_rest or not b_rest or a == b or a_rest == b_rest:
        return None
    return f"{b} {a_rest}", f"{a} {b_rest}"


class CompositionError(ValueError):
    """A composition that is malformed or does not fit the prompt (one-line message)."""


@dataclass(frozen=True)
class Composition:
    kind: str
    subject: str
    relation: str | None = None  # spatial: a phrase of RELATIONS
    object: str | None = None  # spatial: required; presence: optional second entity
    direction: str | None = None  # motion: one of DIRECTIONS
    count: int | None = None  # presence: exactly this many of the subject
    label: str = ""  # free-text label, e.g. for the learned classifier

    def __post_init__(self) -> None:
        for name in ("kind", "subject", "relation", "object", "direction", "label"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise CompositionError(f"composition {name} must be a string, got {type(value).__name__}")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)):
            raise CompositionError(f"composition count must be an integer, got {type(self.count).__name__}")
        if self.kind not in KINDS:
            raise CompositionError(f"composition kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.subject or not self.subject.strip():
            raise CompositionError("composition needs a subject")
        if self.kind == "spatial":
            if self.relation not in RELATIONS:
                raise CompositionError(f"spatial relation must be one of {sorted(RELATIONS)}, got {self.relation!r}")
            if not self.object:
                raise CompositionError("a spatial composition needs an object")
        if self.object and " ".join(self.object.lower().split()) == " ".join(self.subject.lower().split()):
            raise CompositionError(
                f"the composition names {self.subject!r} twice; its entities must differ "
                "(the maps of one entity give no gradient against themselves)"
            )
        if self.count is not None and (self.kind != "presence" or self.object or self.count < 1):
            raise CompositionError("a count needs a presence composition with a single subject and count >= 1")
        if self.kind == "motion" and self.direction not in DIRECTIONS:
            raise CompositionError(f"motion direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if not self.label:
            object.__setattr__(self, "label", self.describe())

    def describe(self) -> str:
        if self.kind == "spatial":
            return f"{self.subject} {self.relation} {self.object}"
        if self.kind == "motion":
            return f"{self.subject} moves {self.direction}"
        if self.count is not None:
            word = {v: k for k, v in NUMBERS.items()}.get(self.count, str(self.count))
            return f"{word} {self.subject}"
        return self.subject if not self.object else f"{self.subject} and {self.object}"

    def family(self) -> tuple[Composition, ...]:
        """The labels a multi-class objective tells this one apart from, this one first: the four relations
        between the same entities, the four directions, the counts one to five, or the two bindings of two
        entities' first words ("red cube and blue ball" / "blue cube and red ball"). A single entity, or
        two whose binding cannot swap, is a family of one. Members carry their own descriptions as labels."""
        if self.kind == "spatial":  # every member in the same words, so no phrasing marks the true one
            mine = RELATIONS[self.relation]
            order = [mine, *(w for w in CANONICAL_RELATIONS if w != mine)]
            return tuple(replace(self, relation=CANONICAL_RELATIONS[w], label="") for w in order)
        if self.kind == "motion":
            others = [replace(self, direction=d, label="") for d in DIRECTIONS if d != self.direction]
        elif self.count is not None:
            others = [replace(self, count=n, label="") for n in NUMBERS.values() if n != self.count]
        elif self.object and (swapped := _swap_binding(self.subject, self.object)):
            others = [replace(self, subject=swapped[0], object=swapped[1], label="")]
        else:
            others = []
        return (replace(self, label=""), *others)

    @property
    def entities(self) -> tuple[str, ...]:
        return (self.subject,) if not self.object else (self.subject, self.object)

    @property
    def axis_sign(self) -> tuple[int, int]:
        """(axis, sign) of the constraint: axis 0 = x (right is +), 1 = y (down is +)."""
        word = RELATIONS[self.relation] if self.kind == "spatial" else self.direction
        return {"left": (0, -1), "right": (0, 1), "above": (1, -1), "up": (1, -1), "below": (1, 1), "down": (1, 1)}[
            word
        ]

    @classmethod
    def parse(cls, text: str) -> Composition:
        """A JSON object, or the compact text forms of the module docstring."""
        text = " ".join(text.strip().split())
        if not text:
            raise CompositionError("composition is empty")
        if text.startswith("{"):
            try:
                return cls.from_dict(json.loads(text))
            except json.JSONDecodeError as e:
                raise CompositionError(f"composition JSON is malformed: {e.msg} at character {e.pos}") from None
        lowered = text.lower()
        for phrase in RELATIONS:  # longest phrases first
            match = re.search(rf"\s{re.escape(phrase)}\s", f" {lowered} ")
            if match:
                subject, obj = lowered[: match.start()].strip(), lowered[match.end() - 1 :].strip()
                return cls("spatial", subject, relation=phrase, object=obj)
        motion = _MOTION.match(lowered)
        if motion:
            return cls("motion", motion["subject"], direction=motion["dir"])
        parts = [p.strip() for p in re.split(r"\s+and\s+|,", lowered) if p.strip()]
        if not 1 <= len(parts) <= 2:
            raise CompositionError(f"a presence composition names one or two entities, got {len(parts)}")
        first, _, rest = parts[0].partition(" ")
        if len(parts) == 1 and rest and (first in NUMBERS or (first.isascii() and first.isdigit())):
            return cls("presence", rest, count=NUMBERS.get(first) or int(first))
        return cls("presence", parts[0], object=parts[1] if len(parts) == 2 else None)

    @classmethod
    def from_dict(cls, data: dict) -> Composition:
        if not isinstance(data, dict):
            raise CompositionError(f"composition must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise CompositionError(f"composition has unknown fields: {', '.join(sorted(unknown))}")
        if "kind" not in data or "subject" not in data:
            raise CompositionError("composition needs 'kind' and 'subject'")
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def entity_tokens(self, tokenizer, prompt: str, max_length: int) -> list[list[int]]:
        """Token indices of each entity's words in `prompt` as the pipeline's tokenizer splits it."""
        return [words for words, _ in self._entity_words(tokenizer, prompt, max_length)]

    def _entity_words(self, tokenizer, prompt: str, max_length: int) -> list[tuple[list[int], list[int]]]:
        """Per entity, the token indices of all its words and of its last word (its noun: "cube" of "red
        cube"; the words before it are its attributes)."""
        encoded = tokenizer(prompt, max_length=max_length, truncation=True, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]

        def within(start: int, end: int) -> list[int]:
            # A token inside the span, or a sentencepiece word mark ("▁", its offsets the space before the
            # word) standing alone just before it: all pieces of a word a T5 tokenizer splits.
            return [
                i
                for i, (a, b) in enumerate(offsets)
                if b > a and a < end and (b > start or (b == start and not prompt[a:b].strip()))
            ]

        found = []
        for entity in self.entities:
            match = re.search(rf"(?<!\w){re.escape(entity)}(?!\w)", prompt, flags=re.IGNORECASE)
            if match is None:
                raise CompositionError(f"composition word {_clip(entity)} is not in the prompt {_clip(prompt)}")
            start, end = match.span()
            words = within(start, end)
            if not words:
                raise CompositionError(f"composition word {entity!r} lies past the first {max_length} prompt tokens")
            noun = [i for i in within(start + match.group(0).rfind(" ") + 1, end) if i in words]
            found.append((words, noun or words))
        return found

    def bind(self, tokenizer, prompts: list[str], max_length: int) -> BoundComposition:
        """Tie the composition to a batch of prompts: one shared token list, per-prompt columns of each
        entity's tokens, and of its noun's."""
        per_prompt = [self._entity_words(tokenizer, p, max_length) for p in prompts]
        for prompt, entities in zip(prompts, per_prompt, strict=True):
            if len(entities) == 2 and set(entities[0][0]) & set(entities[1][0]):  # their maps could not part
                raise CompositionError(
                    f"{self.subject!r} and {self.object!r} share prompt tokens in {prompt!r} (each "
                    "entity binds to its first mention); name each by words of its own"
                )
        tokens = sorted({i for entities in per_prompt for words, _ in entities for i in words})
        column = {token: c for c, token in enumerate(tokens)}
        columns = tuple(tuple([column[i] for i in words] for words, _ in entities) for entities in per_prompt)
        nouns = tuple(tuple([column[i] for i in noun] for _, noun in entities) for entities in per_prompt)
        from cvg.guidance.binding import BoundComposition  # torch: the parser and grammar stay without it

        return BoundComposition.of(self, tokens, columns, nouns)
