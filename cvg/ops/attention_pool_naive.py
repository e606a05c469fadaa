"""The reference backend: materialises P = softmax(q kᵀ·scale). Baseline of every benchmark."""

from __future__ import annotations

import torch

from cvg.ops.pooling import PoolSpec, pool_rows


def attention_pool_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PoolSpec,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    # Half-precision softmax in float32, as the fused kernels accumulate.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return probs @ v, pool_rows(probs[..., spec.tokens], spec)
