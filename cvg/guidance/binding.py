"""`BoundComposition`: a composition tied to a batch of tokenized prompts, and the entity maps it reads
from pooled attention maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # a type only: composition.py imports this module (`Composition.bind`), never the reverse
    from cvg.guidance.composition import Composition


@dataclass(frozen=True)
class BoundComposition:
    """A composition tied to a batch of prompts: the key tokens to record, and for each prompt which of
    the recorded map columns belong to each entity."""

    composition: Composition
    tokens: torch.Tensor  # [T] token indices into the text sequence
    columns: tuple[tuple[list[int], ...], ...]  # [prompt][entity] -> columns among the T maps
    _weights: dict = field(default_factory=dict, compare=False, repr=False)  # (device, dtype, batch) -> [B, T, E]

    @classmethod
    def of(cls, composition: Composition, tokens: list[int], columns: tuple) -> BoundComposition:
        return cls(composition, torch.tensor(tokens), columns)

    def entity_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """`[B, ..., T]` maps -> `[B, ..., entities]`: an entity's map is the mean of its tokens' maps."""
        if maps.shape[0] % len(self.columns):
            raise ValueError(f"maps batch {maps.shape[0]} is not a multiple of the {len(self.columns)} prompts")
        return torch.einsum("b...t,bte->b...e", maps, self._averaging(maps.shape[0], maps.device, maps.dtype))

    def _averaging(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """`[B, T, E]`: 1/|columns| at each entity's columns. Made once per device: a guided step that
        reuses it copies nothing from the host (CUDA-graph capture)."""
        key = (device, dtype, batch)
        if key not in self._weights:
            repeat = batch // len(self.columns)  # num_videos_per_prompt copies, prompt-major
            weights = torch.zeros(batch, self.tokens.numel(), len(self.columns[0]), dtype=torch.float64)
            for b in range(batch):
                for e, cols in enumerate(self.columns[b // repeat]):
                    weights[b, cols, e] = 1.0 / len(cols)
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
        items = tuple(
            BoundComposition(
                b.composition,
                shared,
                (tuple([column[int(b.tokens[c])] for c in cols] for cols in b.columns[0]),),
            )
            for b in bounds
        )
        return cls(shared, items)

    @property
    def composition(self) -> tuple:
        """The items' compositions (what a guided-step graph is specialised to)."""
        return tuple(item.composition for item in self.items)

    @property
    def columns(self) -> tuple:
        return tuple(item.columns[0] for item in self.items)
