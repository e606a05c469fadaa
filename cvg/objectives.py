"""Objectives over pooled cross-attention maps: one interface, `objective(maps, bound) -> loss [B]`.

`maps` is `[B, layers, frames, h, w, T]` (from `MapRecorder.stacked`), `bound` the composition tied to
the prompts. Lower is better; the guided sampler descends the sum over the batch.

Training-free objectives average the layers and turn each entity's maps into per-frame spatial
distributions; centroids use tile-centre coordinates in [0, 1] (x to the right, y downward).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from cvg.composition import BoundComposition, CompositionError

_EPS = 1e-12


class Objective(Protocol):
    def __call__(self, maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor: ...


def entity_maps(maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor:
    """`[B, L, F, H, W, T]` -> `[B, E, F, H, W]`: layer-averaged attention mass of each entity per tile."""
    return bound.entity_maps(maps.mean(dim=1)).movedim(-1, 1)


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

    def __call__(self, maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor:
        peak = entity_maps(maps, bound).flatten(-2).amax(dim=-1)  # [B, E, F]
        return -torch.log(peak + _EPS).mean(dim=(1, 2))


class SpatialRelation:
    """The subject's centroid must sit on the relation's side of the object's, by `margin`, in every frame."""

    def __init__(self, margin: float = 0.1, softness: float = 0.05):
        self.margin, self.softness = margin, softness

    def __call__(self, maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor:
        comp = bound.composition
        if comp.kind != "spatial":
            raise CompositionError(f"the spatial objective needs a spatial composition, got {comp.kind!r}")
        axis, sign = comp.axis_sign
        centres = centroids(entity_maps(maps, bound))  # [B, E, F, 2]
        offset = sign * (centres[:, 0, :, axis] - centres[:, 1, :, axis])  # [B, F]
        return _hinge(offset, self.margin, self.softness).mean(dim=1)


class MotionDirection:
    """The subject's centroid must travel in the direction by `margin` (least-squares slope over frames)."""

    def __init__(self, margin: float = 0.2, softness: float = 0.05):
        self.margin, self.softness = margin, softness

    def __call__(self, maps: torch.Tensor, bound: BoundComposition) -> torch.Tensor:
        comp = bound.composition
        if comp.kind != "motion":
            raise CompositionError(f"the motion objective needs a motion composition, got {comp.kind!r}")
        frames = maps.shape[2]
        if frames < 2:
            raise CompositionError("the motion objective needs at least 2 pooled frames; lower the frame pooling")
        axis, sign = comp.axis_sign
        path = centroids(entity_maps(maps, bound))[:, 0, :, axis]  # [B, F]
        time = torch.linspace(0.0, 1.0, frames, dtype=path.dtype, device=path.device)
        time = time - time.mean()
        slope = ((path - path.mean(dim=1, keepdim=True)) * time).sum(dim=1) / time.square().sum()
        return _hinge(sign * slope, self.margin, self.softness)


def objective_for(kind: str) -> Objective:
    """The training-free objective that fits a composition kind."""
    return {"spatial": SpatialRelation, "motion": MotionDirection, "presence": TokenPresence}[kind]()
