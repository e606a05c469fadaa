"""The learned compositional classifier: interface, model and storage.

`CompositionClassifier(maps, label_embedding) -> logit [B]` scores whether the label holds for the video
whose pooled maps are given; `ClassifierObjective` turns it into the guided sampler's loss
`-log p(label)`. The label side is an embedding from a frozen text backbone, computed by the caller.
Stored as `model.safetensors` + `config.json`; the config records the generator the classifier reads
(layers, token grid, pooling) and loading against another is a clear error. Training: a later issue.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cvg.composition import BoundComposition
from cvg.files import atomic_path, write_text_atomic

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class ClassifierConfig:
    layers: int  # recorded layers the maps come from
    tiles: tuple[int, int, int]  # pooled (frames, height, width) grid
    entities: int = 2
    label_dim: int = 384
    hidden_dim: int = 128
    generator: dict = field(default_factory=dict)  # e.g. {"layers": [...], "pool": [...], "model": "..."}

    def __post_init__(self) -> None:
        self.tiles = tuple(self.tiles)


class CompositionClassifier(nn.Module):
    """A map encoder (per-entity maps -> features) scored against a projected label embedding."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        frames, height, width = config.tiles
        self.map_encoder = nn.Sequential(
            nn.Linear(config.layers * frames * height * width * config.entities, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.hidden_dim),
        )
        self.label_projection = nn.Linear(config.label_dim, config.hidden_dim)

    def forward(self, maps: torch.Tensor, label_embedding: torch.Tensor) -> torch.Tensor:
        """`maps [B, layers, F, H, W, entities]` (entity maps), `label_embedding [B or 1, label_dim]` -> `[B]`."""
        expected = (self.config.layers, *self.config.tiles, self.config.entities)
        if tuple(maps.shape[1:]) != expected:
            raise ValueError(f"classifier expects maps of shape [B, {', '.join(map(str, expected))}], got "
                             f"{list(maps.shape)}")  # fmt: skip
        # Maps are tiny probabilities: compare their shapes, not their scale.
        flat = maps.flatten(1)
        flat = flat / (flat.sum(dim=1, keepdim=True) + 1e-12)
        features = self.map_encoder(flat * flat.shape[1])
        label = self.label_projection(label_embedding)
        return (features * label).sum(-1) / features.shape[-1] ** 0.5

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / CONFIG_NAME, json.dumps(asdict(self.config), indent=1))
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(self.state_dict(), str(tmp))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, generator: dict | None = None) -> CompositionClassifier:
        """Load; with `generator`, fail unless the stored generator description matches it."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"no classifier in {directory}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = ClassifierConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        if generator is not None:
            differs = {k: (config.generator.get(k), v) for k, v in generator.items() if config.generator.get(k) != v}
            if differs:
                detail = "; ".join(f"{k}: trained for {a}, given {b}" for k, (a, b) in differs.items())
                raise ValueError(f"classifier in {directory} was trained for another generator ({detail})")
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()


class ClassifierObjective:
    """`-log p(label)` under a `CompositionClassifier`, for the guided sampler."""

    def __init__(self, classifier: CompositionClassifier, label_embedding: torch.Tensor):
        self.classifier, self.label_embedding = classifier, label_embedding

    def __call__(self, maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor:
        logits = self.classifier(bound.entity_maps(maps), self.label_embedding.to(maps.dtype))
        return F.softplus(-logits)
