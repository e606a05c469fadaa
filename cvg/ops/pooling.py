"""Pooling of per-query attention probabilities into tiles, shared by every attention_pool backend.

A `PoolSpec` says which key columns are read (`tokens`), which tile each query belongs to (`groups`)
and the weight each query carries in its tile's mean (`query_weight`, 1/|tile|, divided by the head
count as well when heads are averaged). Backends turn `P[..., tokens]` rows into pooled maps with
`pool_rows` and turn a pooled gradient back into rows with `unpool_rows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PoolSpec:
    groups: torch.Tensor  # [N] int64, tile of each query
    tokens: torch.Tensor  # [T] int64, selected key columns
    query_weight: torch.Tensor  # [N] float64, weight of each query in its tile's mean
    num_groups: int
    num_heads: int
    keep_heads: bool

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def make_pool_spec(
    groups: torch.Tensor, tokens: torch.Tensor, num_groups: int, num_heads: int, keep_heads: bool
) -> PoolSpec:
    # Counts in float64 (exact for float64 references), by index_add: bincount's length depends on the data.
    ones = torch.ones(groups.shape, dtype=torch.float64, device=groups.device)
    counts = ones.new_zeros(num_groups).index_add_(0, groups, ones)
    divisor = counts if keep_heads else counts * num_heads
    query_weight = 1.0 / divisor[groups]
    return PoolSpec(groups, tokens, query_weight, num_groups, num_heads, keep_heads)


def pool_rows(rows: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """rows `[B, H, N, T]` (probabilities of the selected tokens) -> pooled `[B, G, T]` or `[B, H, G, T]`."""
    weighted = rows * spec.query_weight.to(rows.dtype)[:, None]
    if not spec.keep_heads:
        weighted = weighted.sum(dim=1)
    shape = (*weighted.shape[:-2], spec.num_groups, spec.num_tokens)
    return weighted.new_zeros(shape).index_add_(-2, spec.groups, weighted)


def unpool_rows(dpooled: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """The adjoint of `pool_rows`: pooled gradient -> per-row gradient `[B, H or 1, N, T]`."""
    rows = dpooled.index_select(-2, spec.groups) * spec.query_weight.to(dpooled.dtype)[:, None]
    return rows if spec.keep_heads else rows.unsqueeze(1)


def grid_groups(
    frames: int, height: int, width: int, pool: int | tuple[int, int, int] = 1
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Tile index of every video token of a `frames x height x width` grid flattened frame-major.

    `pool` is one factor for all three axes or one per axis `(frames, height, width)`; edge tiles may
    be smaller. Returns `(groups [frames*height*width], (tiles_f, tiles_h, tiles_w))`; pooled maps
    reshape to `[B, tiles_f, tiles_h, tiles_w, T]`.
    """
    sizes = (frames, height, width)
    factors = (pool,) * 3 if isinstance(pool, int) else tuple(pool)
    if len(factors) != 3:
        raise ValueError(f"pool must be an int or three ints (frames, height, width), got {pool!r}")
    if min(sizes) < 1:
        raise ValueError(f"grid sizes must be positive, got frames={frames} height={height} width={width}")
    if min(factors) < 1:
        raise ValueError(f"pool factors must be positive, got {pool!r}")
    tiles = tuple(math.ceil(s / p) for s, p in zip(sizes, factors, strict=True))
    f, h, w = (torch.arange(s) // p for s, p in zip(sizes, factors, strict=True))
    groups = (f[:, None, None] * tiles[1] + h[None, :, None]) * tiles[2] + w[None, None, :]
    return groups.reshape(-1), tiles
