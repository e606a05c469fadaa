"""The learned compositional classifier: pooled attention maps + a composition label -> p(label holds).

`CompositionClassifier(maps, label_embedding) -> logit [B]`. The map side sees, for each channel (an
entity's tokens, or as the paper reads them its noun's and its attributes' apart, the relation withheld),
recorded layer, head (or their mean) and frame, where the attention lies (its spatial distribution) and how
much of it there is (log mass): shape and strength apart, since attention to a few prompt tokens is tiny.
It aggregates them by an MLP over all of them at once, or (the paper's aggregator) by a small transformer
over one token per (layer, head, frame) with learned layer, head and frame embeddings and the step's noise
level. The label side is a frozen text backbone (`LabelEncoder`: all-MiniLM-L6-v2 by default, any local
`transformers` encoder otherwise), so related labels ("left of" / "to the left of", "ball" / "sphere")
land near each other and share what was learned; only the small head trains. Where the paper hands the
aggregated volume to a frozen vision-language model with a trainable head, the label's embedding scores
the aggregate by an inner product here (docs/classifier.md).

`ClassifierObjective` makes it the guided sampler's loss: `-log sigmoid(score)` of the label for a head trained
binary (each label alone), or `-log softmax` of the label among its family (`Composition.family`: the other
relations, directions, counts or binding) for a head trained multi-class, so that "left of" and "right of"
cannot rise together. Stored as `model.safetensors`
+ `config.json`; the config records the generator it reads (weights hash, recorded layers, pooling, tile
grid) and loading it for another generator is a clear error. Training: `cvg_research.training.dual_inversion`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cvg.guidance.binding import CHANNELS, BoundComposition
from cvg.guidance.composition import Composition
from cvg.io.files import atomic_path, read_json_object, write_text_atomic
from cvg.models.minilm import PACKAGE

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
OBJECTIVES = ("binary", "multiclass")
AGGREGATORS = ("mlp", "transformer")
_EPS = 1e-12


@dataclass
class ClassifierConfig:
    layers: int  # recorded layers the maps come from
    tiles: tuple[int, int, int]  # pooled (frames, height, width) grid
    entities: int = 2  # entity slots; compositions with fewer leave the rest empty
    heads: int = 1  # attention heads read apart (the generator's head count), or 1: their mean
    channels: str = "entities"  # a map per entity, or per entity its noun's and its attributes' ("words")
    aggregator: str = "mlp"  # over all maps at once, or a transformer over (layer, head, frame) tokens
    model_dim: int = 64  # the transformer aggregator's width (two layers, four heads)
    label_dim: int = 384
    hidden_dim: int = 256
    label_encoder: str = PACKAGE  # the frozen backbone: the MiniLM package, or a local transformers directory
    timestep_conditioned: bool = False  # the map side also sees the step's noise level (see `time_features`)
    confidence: float = 0.95  # the largest p it was trained to give (label smoothing): guidance stops there
    objective: str = "binary"  # how it was trained and guides: "binary" per label, or "multiclass" per family
    generator: dict = field(default_factory=dict)  # what it reads: {"transformer": hash, "layers", "pool", ...}

    def __post_init__(self) -> None:
        self.tiles = tuple(self.tiles)
        for name, allowed in (("objective", OBJECTIVES), ("channels", CHANNELS), ("aggregator", AGGREGATORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"classifier {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.heads < 1 or self.model_dim < 4 or self.model_dim % 4:
            raise ValueError(
                f"classifier heads must be at least 1 and model_dim a multiple of 4, got {self.heads}, {self.model_dim}"
            )

    @property
    def slots(self) -> int:
        """Map channels: one per entity slot, or two (noun, attributes)."""
        return self.entities * (2 if self.channels == "words" else 1)

    @property
    def map_tokens(self) -> int:
        """The transformer aggregator's tokens: one per (layer, head, frame)."""
        return self.layers * self.heads * self.tiles[0]


class CompositionClassifier(nn.Module):
    """Map features and the label embedding, each through a small MLP, scored by their inner product: the
    label decides which map patterns count as evidence. Both inputs are standardised with statistics of
    the training set (buffers saved with the weights), because labels that differ in one word ("left" /
    "right") have embeddings that differ little, and raw map features have very different scales."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        _, height, width = config.tiles
        per_token = config.slots * (height * width + 1)  # each channel's distribution and log mass
        features = config.map_tokens * per_token + (TIME_FEATURES if config.timestep_conditioned else 0)
        hidden = config.hidden_dim
        if config.aggregator == "transformer":
            self.map_net = MapTransformer(config, per_token)
        else:
            self.map_net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.label_net = nn.Sequential(nn.Linear(config.label_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.bias = nn.Parameter(torch.zeros(()))
        for name, size in (("feature", features), ("label", config.label_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(size))
            self.register_buffer(f"{name}_scale", torch.ones(size))

    def inputs(self, maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor:
        """Recorded maps `[B, layers, heads, F, H, W, T]` -> what this head reads: its channels of them
        (`BoundComposition.channel_maps`), heads averaged unless it reads them apart."""
        maps = bound.channel_maps(maps, self.config.channels)
        return maps if self.config.heads > 1 else maps.mean(2, keepdim=True)

    def features(self, maps: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, layers, heads, F, H, W, C]` channel maps (C ≤ slots) -> `[B, features]`: distributions and log
        mass (channel-major for the MLP; token-major, a token per (layer, head, frame), for the transformer),
        then the noise level's features when the head is timestep-conditioned (`timestep`: a scalar or `[B]`)."""
        c = self.config
        expected = (c.layers, c.heads, *c.tiles)
        if maps.dim() != 7 or tuple(maps.shape[1:6]) != expected or not 0 < maps.shape[6] <= c.slots:
            raise ValueError(
                f"classifier expects maps of shape [B, {', '.join(map(str, expected))}, 1..{c.slots}], "
                f"got {list(maps.shape)}"
            )
        maps = F.pad(maps, (0, c.slots - maps.shape[6]))  # empty slots 0
        mass = maps.sum(dim=(4, 5), keepdim=True)
        shape = maps / (mass + _EPS) * (maps.shape[4] * maps.shape[5])  # 1 per tile when spread evenly
        log_mass = torch.log(mass + _EPS)
        if c.aggregator == "transformer":
            parts = [torch.cat([shape.flatten(4), log_mass.flatten(4)], dim=-1).flatten(1)]
        else:
            parts = [shape.movedim(-1, 1).flatten(1), log_mass.movedim(-1, 1).flatten(1)]
        if c.timestep_conditioned:
            if timestep is None:
                raise ValueError("this classifier is conditioned on the timestep: pass the step's timestep")
            parts.append(time_features(timestep, maps.shape[0]).to(maps.dtype))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def standardise(
        self, maps: torch.Tensor, label_embeddings: torch.Tensor, timesteps: torch.Tensor | None = None
    ) -> None:
        """Set the input statistics from training maps (read at `timesteps [B]`) and the distinct training
        labels' embeddings."""
        for name, x in (("feature", self.features(maps, timesteps)), ("label", label_embeddings)):
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_scale").copy_(1 / x.std(0).clamp_min(1e-4))

    def _sides(
        self, maps: torch.Tensor, labels: torch.Tensor, timestep: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The map side `[B, hidden]` and the label side `[K, hidden]`, each standardised and through its MLP."""
        features = (self.features(maps, timestep) - self.feature_mean) * self.feature_scale
        label = (labels.to(features.dtype) - self.label_mean) * self.label_scale
        return self.map_net(features), self.label_net(label)

    def forward(
        self, maps: torch.Tensor, label_embedding: torch.Tensor, timestep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`maps [B, layers, heads, F, H, W, C]` (`inputs`), `label_embedding [B or 1, label_dim]`, the timestep
        the maps were read at (scalar or `[B]`; needed when timestep-conditioned, else ignored) -> logits `[B]`."""
        video, label = self._sides(maps, label_embedding, timestep)
        scores = video * label.expand(video.shape[0], -1)
        return scores.sum(-1) / self.config.hidden_dim**0.5 + self.bias

    def scores(self, maps: torch.Tensor, labels: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """K labels against each map set -> logits `[B, K]` (a label family's scores, for the multi-class
        objective): `labels [K, label_dim]` the same for every map set, or `[B, K, label_dim]` one family each."""
        video, label = self._sides(maps, labels, timestep)
        scores = video @ label.T if label.dim() == 2 else (video.unsqueeze(1) * label).sum(-1)
        return scores / self.config.hidden_dim**0.5 + self.bias

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(self.state_dict(), str(tmp))
        write_text_atomic(directory / CONFIG_NAME, json.dumps(asdict(self.config), indent=1))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, generator: dict | None = None) -> CompositionClassifier:
        """Load; with `generator`, fail unless the stored generator description matches it."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"no classifier in {directory}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        fields = read_json_object(directory / CONFIG_NAME)
        if unknown := set(fields) - set(ClassifierConfig.__dataclass_fields__):
            raise ValueError(f"{directory / CONFIG_NAME}: unknown fields {', '.join(sorted(unknown))}")
        try:
            config = ClassifierConfig(**fields)
        except TypeError as e:  # a field missing
            raise ValueError(f"{directory / CONFIG_NAME}: {e}") from None
        if generator is not None:
            differs = {k: (config.generator.get(k), v) for k, v in generator.items() if config.generator.get(k) != v}
            if differs:
                detail = "; ".join(f"{k}: trained for {a}, given {b}" for k, (a, b) in differs.items())
                raise ValueError(f"classifier in {directory} was trained for another generator ({detail})")
        model = cls(config)
        try:
            model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        except Exception as e:  # torn or foreign weights (safetensors' own error type, shape mismatches)
            raise ValueError(f"cannot load {directory / WEIGHTS_NAME}: {type(e).__name__}: {e}") from e
        return model.eval().requires_grad_(False)


TIME_FEATURES = 2


def time_features(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    """`[batch, 2]` float32: sigma = timestep / 1000 and log(1 - sigma + 1e-3), which spreads apart the
    high noise levels the guided steps sit at (sigma 1.0, 0.98, 0.96 -> -6.9, -3.9, -3.3)."""
    sigma = (torch.as_tensor(timestep).float() / 1000.0).reshape(-1).expand(batch)
    return torch.stack([sigma, torch.log1p(1e-3 - sigma)], dim=1)


class MapTransformer(nn.Module):
    """The paper's aggregator, standardised features `[B, features]` -> `[B, hidden]`: one token per (layer,
    head, frame) whose features are every channel's tile distribution and log mass, plus learned layer, head
    and frame embeddings; a summary token (carrying the noise level, when conditioned) whose output after two
    pre-norm encoder layers is the map side."""

    def __init__(self, config: ClassifierConfig, per_token: int):
        super().__init__()
        width = config.model_dim
        self.config, self.per_token = config, per_token
        self.embed = nn.Linear(per_token, width)
        self.layer_embedding = nn.Parameter(0.02 * torch.randn(config.layers, 1, 1, width))
        self.head_embedding = nn.Parameter(0.02 * torch.randn(1, config.heads, 1, width))
        self.frame_embedding = nn.Parameter(0.02 * torch.randn(1, 1, config.tiles[0], width))
        self.summary = nn.Parameter(torch.zeros(1, 1, width))
        self.time = nn.Linear(TIME_FEATURES, width) if config.timestep_conditioned else None
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, config.hidden_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        grid = (c.layers, c.heads, c.tiles[0], self.per_token)
        tokens = self.embed(features[:, : c.map_tokens * self.per_token].unflatten(1, grid))
        tokens = tokens + self.layer_embedding + self.head_embedding + self.frame_embedding
        summary = self.summary.expand(features.shape[0], -1, -1)
        if self.time is not None:
            summary = summary + self.time(features[:, -TIME_FEATURES:]).unsqueeze(1)
        return self.out(self.encoder(torch.cat([summary, tokens.flatten(1, 3)], dim=1))[:, 0])


class LabelEncoder:
    """A frozen text backbone: labels -> mean-pooled, L2-normalised embeddings, cached per label."""

    def __init__(self, source: str = PACKAGE):
        if source == PACKAGE:
            from cvg.models.minilm import load_minilm

            self.tokenizer, self.model = load_minilm()
        else:
            from transformers import AutoModel, AutoTokenizer

            if not Path(source).is_dir():
                raise FileNotFoundError(f"label encoder directory {source!r} does not exist")
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModel.from_pretrained(source, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, labels: list[str]) -> torch.Tensor:
        """`[len(labels), dim]` float32 embeddings."""
        missing = sorted({label for label in labels if label not in self._cache})
        if missing:
            batch = self.tokenizer(missing, padding=True, return_tensors="pt")
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).float()
            self._cache.update(zip(missing, pooled, strict=True))
        return torch.stack([self._cache[label] for label in labels])


def label_of(composition: Composition) -> str:
    """The text the classifier scores: the composition's free-text label, else its canonical description."""
    return composition.label or composition.describe()


class ClassifierObjective:
    """`-log p(label)` under a `CompositionClassifier`, for the guided sampler. `target_loss` is
    `-log confidence`: past the confidence it was trained to, the head's p says nothing more about the
    video, so a bounded guided step stops there."""

    def __init__(self, classifier: CompositionClassifier, encoder: LabelEncoder | None = None):
        self.classifier = classifier.eval().requires_grad_(False)
        self.target_loss = -math.log(classifier.config.confidence)
        self.encoder = encoder or LabelEncoder(classifier.config.label_encoder)
        self._labels: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}  # on the maps' device, once

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, generator: dict | None = None) -> ClassifierObjective:
        return cls(CompositionClassifier.from_pretrained(directory, generator))

    def _embeddings(self, labels: list[str], device: torch.device) -> torch.Tensor:
        key = (tuple(labels), device)
        if key not in self._labels:
            self._labels[key] = self.encoder(labels).to(device)
        return self._labels[key]

    def __call__(self, maps: torch.Tensor, bound: BoundComposition, timestep: torch.Tensor | None = None):
        inputs = self.classifier.inputs(maps, bound)
        family = []  # a binary head scores the label alone: no family to build on every guided step
        if self.classifier.config.objective == "multiclass":
            family = [label_of(c) for c in bound.composition.family()]
        if len(family) > 1:
            logits = self.classifier.scores(inputs, self._embeddings(family, maps.device), timestep)
            return -logits.log_softmax(-1)[:, 0]
        label = self._embeddings([label_of(bound.composition)], maps.device)
        return F.softplus(-self.classifier(inputs, label, timestep))
