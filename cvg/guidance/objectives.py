"""Objectives over pooled cross-attention maps: one interface, `objective(maps, bound, timestep) -> loss [B]`.

`maps` is `[B, layers, heads, frames, h, w, T]` (from `MapRecorder.stacked`), `bound` the composition tied to
the prompts, `timestep` the step's timestep (a tensor; None where unknown), which a learned objective may
be conditioned on. Lower is better; the guided sampler descends the sum over the batch.

Training-free objectives average the layers and turn each entity's maps into per-frame spatial
distributions; centroids use tile-centre coordinates in [0, 1] (x to the right, y downward).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from cvg.guidance.binding import BoundComposition
from cvg.guidance.composition import CompositionError

_EPS = 1e-12


class Objective(Protocol):
    def __call__(
        self, maps: torch.Tensor, bound: BoundComposition, timestep: torch.Tensor | None = None
    ) -> torch.Tensor: ...


def entity_maps(maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor:
    """`[B, L, heads, F, H, W, T]` -> `[B, E, F, H, W]`: the attention mass of each entity per tile, layers and
    heads averaged."""
    return bound.entity_maps(maps.mean(dim=(1, 2))).movedim(-1, 1)


def centroids(mass: torch.Tensor) -> torch.Tensor:
    """`[..., H, W]` attention mass -> `[..., 2]` centroid (x, y) of its normalised distribution."""
    height, width = mass.shape[-2:]
    dist = mass / (mass.sum(dim=(-2, -1), keepdim=True) + _EPS)
    ys = (torch.arange(height, dtype=mass.dtype, device=mass.device) + 0.5) / height
    xs = (torch.arange(width, dtype=mass.dtype, device=mass.device) + 0.5) / width
    return torch.stack([(dist.sum(-2) * xs).sum(-1), (dist.sum(-1) * ys).sum(-1)], dim=-1)


def _hinge(value: torch.Tensor, margin: float, softness: float) -> torch.Tensor:
    """Smooth penalty for `value < margin`: softness · softplus((margin - value) / softness)."""
    return softness * F.softplus((margin - value) / softness)


class TokenPresence:
    """Attend-and-Excite style: every entity must hold a strong attention peak in every frame.
    Loss: mean over entities and frames of -log(max over tiles of the entity's attention mass)."""

    def __call__(self, maps: torch.Tensor, bound: BoundComposition, timestep: torch.Tensor | None = None):
        peak = entity_maps(maps, bound).flatten(-2).amax(dim=-1)  # [B, E, F]
        return -torch.log(peak + _EPS).mean(dim=(1, 2))


class _CentroidObjective:
    """A smooth hinge on a centroid quantity of one composition kind."""

    kind = ""

    def __init__(self, margin: float, softness: float = 0.05):
        self.margin, self.softness = margin, softness

    def __call__(self, maps: torch.Tensor, bound: BoundComposition, timestep: torch.Tensor | None = None):
        comp = bound.composition
        if comp.kind != self.kind:
            raise CompositionError(f"the {self.kind} objective needs a {self.kind} composition, got {comp.kind!r}")
        axis, sign = comp.axis_sign
        return _hinge(sign * self.measure(centroids(entity_maps(maps, bound))[..., axis]), self.margin, self.softness)

    def measure(self, centres: torch.Tensor) -> torch.Tensor:
        """`[B, E, F]` centroid coordinate along the constrained axis -> `[B, ...]` signed quantity."""
        raise NotImplementedError


class SpatialRelation(_CentroidObjective):
    """The subject's centroid must sit on the relation's side of the object's, by `margin`, in every frame."""

    kind = "spatial"

    def __init__(self, margin: float = 0.1, softness: float = 0.05):
        super().__init__(margin, softness)

    def __call__(self, maps: torch.Tensor, bound: BoundComposition, timestep: torch.Tensor | None = None):
        return super().__call__(maps, bound, timestep).mean(dim=1)  # mean over frames

    def measure(self, centres: torch.Tensor) -> torch.Tensor:
        return centres[:, 0] - centres[:, 1]  # [B, F]


class MotionDirection(_CentroidObjective):
    """The subject's centroid must travel in the direction by `margin` (least-squares slope over frames)."""

    kind = "motion"

    def __init__(self, margin: float = 0.2, softness: float = 0.05):
        super().__init__(margin, softness)

    def measure(self, centres: torch.Tensor) -> torch.Tensor:
        path, frames = centres[:, 0], centres.shape[-1]  # [B, F]
        if frames < 2:
            raise CompositionError("the motion objective needs at least 2 pooled frames; lower the frame pooling")
        time = torch.linspace(0.0, 1.0, frames, dtype=path.dtype, device=path.device)
        time = time - time.mean()
        return ((path - path.mean(dim=1, keepdim=True)) * time).sum(dim=1) / time.square().sum()


class SumObjective:
    """The sum of several objectives' losses; its `target_loss` is the sum of theirs (0 for one without)."""

    def __init__(self, *parts: Objective):
        self.parts = parts
        self.target_loss = sum(getattr(part, "target_loss", None) or 0.0 for part in parts)

    def __call__(self, maps: torch.Tensor, bound: BoundComposition, timestep: torch.Tensor | None = None):
        return sum(part(maps, bound, timestep) for part in self.parts)


GEOMETRIC_KINDS = ("spatial", "motion")  # kinds whose training-free objective measures the composition itself


def objective_for(kind: str) -> Objective:
    """The training-free objective that fits a composition kind."""
    return {"spatial": SpatialRelation, "motion": MotionDirection, "presence": TokenPresence}[kind]()


class ItemwiseObjective:
    """Item i of the batch scored by `objectives[i]` on its own maps and composition (`BoundBatch`): served
    requests with different compositions and objectives guided in one run. `target_loss` is per item
    (`[B]`, 0 for an objective without one, which bounds a non-negative loss as no target does)."""

    def __init__(self, objectives: list[Objective]):
        self.objectives = objectives
        targets = [getattr(o, "target_loss", None) for o in objectives]
        self.target_loss = None if all(t is None for t in targets) else torch.tensor([t or 0.0 for t in targets])

    def __call__(self, maps: torch.Tensor, bound, timestep: torch.Tensor | None = None) -> torch.Tensor:
        if maps.shape[0] != len(self.objectives):
            raise ValueError(f"{maps.shape[0]} maps for {len(self.objectives)} itemwise objectives")
        return torch.cat(
            [
                o(maps[i : i + 1], item, timestep)
                for i, (o, item) in enumerate(zip(self.objectives, bound.items, strict=True))
            ]
        )
