"""Tolerances from the dtype's own rounding, never fixed absolute numbers: `count` units in the last place
of the compared values' magnitude. Two float32 sums of the same terms in another order (other thread
counts, other kernels) differ by a few ulps per term reordered; 64 covers the sums these tests compare."""

from __future__ import annotations

import torch


def ulps(reference: torch.Tensor, count: int = 64) -> float:
    """`count` ulps of `reference`'s dtype at its largest magnitude."""
    return count * torch.finfo(reference.dtype).eps * max(reference.detach().abs().max().item(), 1e-30)
