"""Training-free objectives on synthetic maps: they rank compositions the right way and are differentiable."""

import pytest
import torch

from cvg.guidance.binding import BoundComposition
from cvg.guidance.composition import Composition
from cvg.guidance.objectives import (
    MotionDirection,
    SpatialRelation,
    SumObjective,
    TokenPresence,
    centroids,
    objective_for,
)


def _bound(text):
    comp = Composition.parse(text)
    columns = ([0], [1]) if comp.object else ([0],)
    return BoundComposition(comp, torch.arange(len(columns)), (columns,))


def _blob(frames, height, width, xs, ys, sharp=20.0):
    """[F, H, W] attention mass peaked at (x, y) in [0, 1] coordinates per frame."""
    gy = (torch.arange(height) + 0.5) / height
    gx = (torch.arange(width) + 0.5) / width
    out = []
    for x, y in zip(xs, ys, strict=True):
        out.append(torch.exp(-sharp * ((gx[None, :] - x) ** 2 + (gy[:, None] - y) ** 2)))
    return torch.stack(out) * 1e-2


def _maps(*entity_blobs):
    """Entities' [F, H, W] maps -> [1, layers=2, heads=2, F, H, W, E], the second head half the first."""
    maps = torch.stack(entity_blobs, dim=-1)
    heads = torch.stack([maps, maps / 2])
    return torch.stack([heads, heads], dim=0)[None]


def test_centroids_of_a_point_mass():
    mass = torch.zeros(4, 8)
    mass[1, 6] = 1.0
    torch.testing.assert_close(centroids(mass), torch.tensor([6.5 / 8, 1.5 / 4]))


@pytest.mark.parametrize("relation, sign", [("left of", 1), ("right of", -1)])
def test_spatial_relation_prefers_the_named_side(relation, sign):
    bound = _bound(f"cube {relation} ball")
    left, right = _blob(3, 6, 8, [0.2] * 3, [0.5] * 3), _blob(3, 6, 8, [0.8] * 3, [0.5] * 3)
    good = SpatialRelation()(_maps(left, right) if sign == 1 else _maps(right, left), bound)
    bad = SpatialRelation()(_maps(right, left) if sign == 1 else _maps(left, right), bound)
    assert good.shape == (1,) and good < 0.01 < bad


def test_vertical_relation():
    bound = _bound("cube above ball")
    top, bottom = _blob(2, 8, 8, [0.5] * 2, [0.2] * 2), _blob(2, 8, 8, [0.5] * 2, [0.8] * 2)
    assert SpatialRelation()(_maps(top, bottom), bound) < SpatialRelation()(_maps(bottom, top), bound)


def test_motion_direction_prefers_the_named_direction():
    bound = _bound("ball moves right")
    rightward = _blob(5, 6, 8, [0.1, 0.3, 0.5, 0.7, 0.9], [0.5] * 5)
    leftward = rightward.flip(0)
    loss = MotionDirection()
    assert loss(_maps(rightward), bound) < 0.01 < loss(_maps(leftward), bound)
    with pytest.raises(ValueError, match="at least 2 pooled frames"):
        loss(_maps(rightward[:1]), bound)


def test_presence_prefers_peaked_maps():
    bound = _bound("cube and ball")
    peaked = _blob(2, 6, 6, [0.3, 0.3], [0.3, 0.3], sharp=80) * 5
    flat = torch.full_like(peaked, 1e-3)
    assert TokenPresence()(_maps(peaked, peaked), bound) < TokenPresence()(_maps(flat, flat), bound)


@pytest.mark.parametrize("text", ["cube left of ball", "ball moves down", "cube and ball"])
def test_objectives_are_differentiable(text):
    bound = _bound(text)
    entities = 2 if bound.composition.object else 1
    maps = (torch.rand(2, 2, 2, 3, 4, 5, entities) * 1e-2).requires_grad_()
    loss = objective_for(bound.composition.kind)(maps, _bound_batch(bound, 2))
    (grad,) = torch.autograd.grad(loss.sum(), maps)
    assert loss.shape == (2,) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def _bound_batch(bound, batch):
    return BoundComposition(bound.composition, bound.tokens, bound.columns * batch)


def test_objective_rejects_other_kinds():
    with pytest.raises(ValueError, match="needs a spatial composition"):
        SpatialRelation()(_maps(_blob(2, 4, 4, [0.5] * 2, [0.5] * 2)), _bound("ball moves up"))


def test_sum_objective_adds_losses_and_targets():
    class _Constant:
        def __init__(self, value, target=None):
            self.value, self.target_loss = value, target

        def __call__(self, maps, bound, timestep=None):
            return torch.full((maps.shape[0],), self.value)

    summed = SumObjective(_Constant(1.5, 0.25), _Constant(2.0))
    assert summed.target_loss == 0.25
    assert summed(torch.zeros(3, 1), None).tolist() == [3.5, 3.5, 3.5]
