"""`BoundComposition`: a composition tied to a batch of tokenized prompts, and the entity maps it reads
from pooled attention maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # a type only: composition.py imports this module (`Composition.bind`), never the reverse
    from cvg.guidance.composition import Composition


CHANNELS = ("entities", "words")  # what a map channel is: an entity's tokens, or its noun's and its attributes'


@dataclass(frozen=True)
class BoundComposition:
    """A composition tied to a batch of prompts: the key tokens to record, and for each prompt which of
    the recorded map columns belong to each entity, and to its noun (its last word)."""

    composition: Composition
    tokens: torch.Tensor  # [T] token indices into the text sequence
    columns: tuple[tuple[list[int], ...], ...]  # [prompt][entity] -> columns among the T maps
    nouns: tuple[tuple[list[int], ...], ...] = ()  # [prompt][entity] -> the columns of its last word
    # (channels, device, dtype, batch) -> [B, T, C]
    _weights: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, composition: Composition, tokens: list[int], columns: tuple, nouns: tuple = ()) -> BoundComposition:
        return cls(composition, torch.tensor(tokens), columns, nouns)

    def entity_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """`[B, ..., T]` maps -> `[B, ..., entities]`: an entity's map is the mean of its tokens' maps."""
        return self.channel_maps(maps, "entities")

    def word_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """`[B, ..., T]` maps -> `[B, ..., 2 * entities]`: per entity, the mean map of its noun's tokens, then of
        its attributes' (the words before the noun: "red" of "red cube"; the noun's again where it has none).
        The relation's words are never among them."""
        return self.channel_maps(maps, "words")

    def channel_maps(self, maps: torch.Tensor, channels: str) -> torch.Tensor:
        """`entity_maps` or `word_maps`, by `channels` (one of `CHANNELS`)."""
        if maps.shape[0] % len(self.columns):
            raise ValueError(f"maps batch {maps.shape[0]} is not a multiple of the {len(self.columns)} prompts")
        weights = self._averaging(channels, maps.shape[0], maps.device, maps.dtype)
        return torch.einsum("b...t,btc->b...c", maps, weights)

    def channels(self, prompt: int, channels: str) -> list[list[int]]:
        """The columns averaged into each channel of one prompt's maps."""
        if channels not in CHANNELS:
            raise ValueError(f"map channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
        entities = self.columns[prompt]
        if channels == "entities":
            return list(entities)
        if not self.nouns:
            raise ValueError("this binding does not know which words are nouns: bind it with Composition.bind")
        words = []
        for cols, noun in zip(entities, self.nouns[prompt], strict=True):
            words += [noun, [c for c in cols if c not in noun] or noun]
        return words

    def _averaging(self, channels: str, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`[B, T, C]`: 1/|columns| at each channel's columns. Made once per device: a guided step that
        reuses it copies nothing from the host (CUDA-graph capture)."""
        key = (channels, device, dtype, batch)
        if key not in self._weights:
            repeat = batch // len(self.columns)  # num_videos_per_prompt copies, prompt-major
            per_prompt = [self.channels(p, channels) for p in range(len(self.columns))]
            weights = torch.zeros(batch, self.tokens.numel(), len(per_prompt[0]), dtype=torch.float64)
            for b in range(batch):
                for c, cols in enumerate(per_prompt[b // repeat]):
                    weights[b, cols, c] = 1.0 / len(cols)
            self._weights[key] = weights.to(device, dtype)
        return self._weights[key]


@dataclass(frozen=True)
class BoundBatch:
    """A batch whose items carry compositions of their own (served requests run as one batch): the token
    list maps are recorded for, the union of the items', and each item's composition bound to it."""

    tokens: torch.Tensor  # [T] the union of the items' token indices
    items: tuple[BoundComposition, ...]  # one per batch item, each bound to one prompt, columns into `tokens`

    @classmethod
    def of(cls, bounds: list[BoundComposition]) -> BoundBatch:
        """From compositions each bound to one prompt (`Composition.bind` of a single prompt)."""
        if any(len(b.columns) != 1 for b in bounds):
            raise ValueError("BoundBatch.of takes compositions bound to one prompt each")
        tokens = sorted({int(i) for b in bounds for i in b.tokens})
        column = {token: c for c, token in enumerate(tokens)}
        shared = torch.tensor(tokens)

        def remapped(b: BoundComposition, per_entity: tuple) -> tuple:
            return (tuple([column[int(b.tokens[c])] for c in cols] for cols in per_entity[0]),) if per_entity else ()

        items = tuple(
            BoundComposition(b.composition, shared, remapped(b, b.columns), remapped(b, b.nouns)) for b in bounds
        )
        return cls(shared, items)

    @property
    def composition(self) -> tuple:
        """The items' compositions (what a guided-step graph is specialised to)."""
        return tuple(item.composition for item in self.items)

    @property
    def columns(self) -> tuple:
        return tuple(item.columns[0] for item in self.items)
