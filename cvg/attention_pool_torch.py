"""The portable backend: stock fused attention, no [B, H, N, M] tensor in forward or backward.

Pooled maps are attention whose values are one-hot columns of the selected tokens, so one attention
call over `v_aug = [v | onehot(tokens)]` returns `[out | P[..., tokens]]`. q and k are zero-padded to
the same width because SDPA's fused CPU and flash kernels need equal head dims.

On CPU, a custom autograd function calls the fused kernel's forward, which also returns the
log-sum-exp, so the selected columns come from one small [N, T] product and forward needs no
augmented width; backward calls the fused kernel's backward on the augmented tensors chunk by
chunk of queries. Saved for backward: q, k, v, out and the log-sum-exp.

Elsewhere, autograd through one augmented `scaled_dot_product_attention` call keeps the
O(B·H·N·(D+T)) bound.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from cvg.pooling import PoolSpec, pool_rows, unpool_rows

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# Elements of one [B, H, rows, D+T] chunk: bounds the transient augmented copies of backward (1 MB fp32).
_CHUNK_ELEMENTS = 1 << 18
_MIN_CHUNK_ROWS = 256


def augment_keys_values(k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k zero-padded by T columns; v with one-hot columns of `tokens` appended. Both `[B, H, M, D+T]`."""
    batch, heads, keys, _ = v.shape
    # [M, T]; not F.one_hot, which checks its indices on the host on CPU: the step stays free of host reads
    onehot = (torch.arange(keys, device=tokens.device)[:, None] == tokens[None, :]).to(v.dtype)
    v_aug = torch.cat([v, onehot.expand(batch, heads, keys, tokens.numel())], dim=-1)
    return F.pad(k, (0, tokens.numel())), v_aug


def _query_chunks(batch: int, heads: int, queries: int, width: int) -> Iterator[slice]:
    """Query ranges of about `_CHUNK_ELEMENTS` elements over all batch items and heads: the fused CPU
    backward parallelises over (batch, head), so every call keeps all of them."""
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // (batch * heads * width))
    for start in range(0, queries, rows):
        yield slice(start, min(start + rows, queries))


def selected_probs(
    q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """`P[..., tokens]` from the log-sum-exp of each query row: `[B, H, N, T]` in float32 (or float64), no
    [N, M] tensor. The scores are formed in float32 as the fused kernel forms them: a half-precision score
    of size 1e3 is off by up to 4 (bf16), and exp() of that error is no probability at all."""
    wide = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(wide) @ k[:, :, tokens].to(wide).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias[..., tokens]
    return torch.exp(scores - lse[..., None].to(wide))


class _FusedCPUAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, spec: PoolSpec, scale: float):
        # Forward needs no augmented width: the fused kernel's log-sum-exp gives the selected columns.
        out, lse = _FLASH_CPU(q, k, v, attn_mask=bias, scale=scale)
        rows = selected_probs(q, k, spec.tokens, bias, lse, scale)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.spec, ctx.scale = spec, scale
        return out, pool_rows(rows, spec).to(q.dtype)  # pooled in float32, rounded once

    @staticmethod
    def backward(ctx, dout, dpooled):
        q, k, v, out, lse, bias = ctx.saved_tensors
        spec: PoolSpec = ctx.spec
        batch, heads, queries, dim = q.shape
        n_tok = spec.num_tokens
        k_aug, v_aug = augment_keys_values(k, v, spec.tokens)
        drows = unpool_rows(dpooled, spec).to(q.dtype)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for n in _query_chunks(batch, heads, queries, dim + n_tok):
            q_n, lse_n = q[:, :, n], lse[:, :, n]
            rows = selected_probs(q_n, k, spec.tokens, bias, lse_n, ctx.scale).to(q.dtype)
            gq, gk, gv = _FLASH_CPU_BACKWARD(
                torch.cat([dout[:, :, n], drows[:, :, n].expand_as(rows)], dim=-1),
                F.pad(q_n, (0, n_tok)),
                k_aug,
                v_aug,
                torch.cat([out[:, :, n], rows], dim=-1),
                lse_n,
                0.0,
                False,
                attn_mask=bias,
                scale=ctx.scale,
            )
            dq[:, :, n] = gq[..., :dim]
            dk += gk[..., :dim]
            dv += gv[..., :dim]
            del gq, gk, gv, rows  # free before the next chunk's call, not after it
        return dq, dk, dv, None, None, None


def attention_pool_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PoolSpec,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type == "cpu":
        return _FusedCPUAttentionPool.apply(q, k, v, bias, spec, scale)
    return attention_pool_sdpa(q, k, v, spec, scale, bias)


def attention_pool_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PoolSpec,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Any device: one augmented SDPA call, autograd through it."""
    dim = q.shape[-1]
    k_aug, v_aug = augment_keys_values(k, v, spec.tokens)
    q_aug = F.pad(q, (0, spec.num_tokens))
    bias = None if bias is None else bias.to(q.dtype)  # SDPA takes a mask of the query's dtype
    o = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=bias, scale=scale)
    return o[..., :dim], pool_rows(o[..., dim:], spec)
