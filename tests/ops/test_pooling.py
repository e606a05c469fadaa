"""Tiles of a video-token grid and the pooling operator shared by the backends."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cvg import grid_groups
from cvg.ops.pooling import make_pool_spec, pool_rows, unpool_rows


@given(
    st.integers(1, 6),
    st.integers(1, 7),
    st.integers(1, 9),
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
)
def test_grid_groups_matches_loops(frames, height, width, pool):
    groups, tiles = grid_groups(frames, height, width, pool)
    expected, i = [], 0
    for f in range(frames):
        for h in range(height):
            for w in range(width):
                expected.append(((f // pool[0]) * tiles[1] + h // pool[1]) * tiles[2] + w // pool[2])
                i += 1
    assert groups.tolist() == expected
    assert tiles == tuple(-(-s // p) for s, p in zip((frames, height, width), pool, strict=True))
    assert sorted(set(expected)) == list(range(tiles[0] * tiles[1] * tiles[2]))  # every tile is used


def test_grid_groups_single_factor_and_reshape():
    groups, tiles = grid_groups(4, 6, 8, 2)
    assert tiles == (2, 3, 4)
    # A token's pooled map reshapes back onto the grid: a constant per tile survives the round trip.
    grid = groups.view(4, 6, 8)
    assert grid[1, 5, 7] == grid[0, 4, 6] == (0 * 3 + 2) * 4 + 3


@pytest.mark.parametrize("pool, message", [((2, 2), "three ints"), (0, "positive"), ((1, 1, -1), "positive")])
def test_grid_groups_bad_pool(pool, message):
    with pytest.raises(ValueError, match=message):
        grid_groups(2, 2, 2, pool)


@settings(max_examples=30)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(1, 3), st.integers(1, 5), st.booleans(), st.integers(0, 999))
def test_unpool_is_the_adjoint_of_pool(n, groups_count, heads, tokens, keep_heads, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, groups_count, (n,), generator=gen)
    spec = make_pool_spec(groups, torch.zeros(tokens, dtype=torch.long), groups_count, heads, keep_heads)
    rows = torch.randn(2, heads, n, tokens, generator=gen, dtype=torch.float64)
    pooled_grad = torch.randn(pool_rows(rows, spec).shape, generator=gen, dtype=torch.float64)
    lhs = (pool_rows(rows, spec) * pooled_grad).sum()
    rhs = (rows * unpool_rows(pooled_grad, spec)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_pool_rows_is_a_mean_over_heads_and_tile_members():
    groups = torch.tensor([0, 1, 0, 0])
    rows = torch.arange(2 * 4 * 1, dtype=torch.float64).view(1, 2, 4, 1)  # heads 0..1, queries 0..3
    pooled = pool_rows(rows, make_pool_spec(groups, torch.tensor([0]), 2, 2, keep_heads=False))
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([(0 + 2 + 3 + 4 + 6 + 7) / 6, (1 + 5) / 2]).double())
