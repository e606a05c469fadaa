"""The portable backend: stock fused attention, no [B, H, N, M] tensor in forward or backward.

Pooled maps are attention whose values are one-hot columns of the selected tokens, so one attention
call over `v_aug = [v | onehot(tokens)]` returns `[out | P[..., tokens]]`. q and k are zero-padded to
the same width because SDPA's fused CPU and flash kernels need equal head dims.

On CPU, a custom autograd function calls the fused kernel's forward (which returns the log-sum-exp)
and its backward directly, head chunk by head chunk, saving only q, k, v, out, the selected rows and
the log-sum-exp. Elsewhere, autograd through `scaled_dot_product_attention` keeps the same O(N·(D+T))
bound per head.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from cvg.pooling import PoolSpec, pool_rows, unpool_rows

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# Elements of one [heads, N, D+T] chunk: bounds the transient padded/augmented copies (~16 MB fp32).
_CHUNK_ELEMENTS = 1 << 22


def augment_keys_values(k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k zero-padded by T columns; v with one-hot columns of `tokens` appended. Both `[B, H, M, D+T]`."""
    batch, heads, keys, _ = v.shape
    onehot = F.one_hot(tokens, keys).to(v.dtype).T  # [M, T]
    v_aug = torch.cat([v, onehot.expand(batch, heads, keys, tokens.numel())], dim=-1)
    return F.pad(k, (0, tokens.numel())), v_aug


def _chunks(batch: int, heads: int, head_elements: int) -> Iterator[tuple[slice, slice]]:
    """(batch, head range) chunks of about `_CHUNK_ELEMENTS` elements, at least one head each."""
    per_chunk = max(1, _CHUNK_ELEMENTS // head_elements)
    for b in range(batch):
        for h in range(0, heads, per_chunk):
            yield slice(b, b + 1), slice(h, min(h + per_chunk, heads))


class _FusedCPUAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, spec: PoolSpec, scale: float):
        batch, heads, queries, dim = q.shape
        n_tok = spec.num_tokens
        k_aug, v_aug = augment_keys_values(k, v, spec.tokens)
        out = torch.empty_like(q)
        rows = q.new_empty(batch, heads, queries, n_tok)
        lse = q.new_empty(batch, heads, queries, dtype=torch.promote_types(q.dtype, torch.float32))
        for b, h in _chunks(batch, heads, queries * (dim + n_tok)):
            o, lse[b, h] = _FLASH_CPU(
                F.pad(q[b, h], (0, n_tok)), k_aug[b, h], v_aug[b, h], attn_mask=_rows(bias, b), scale=scale
            )
            out[b, h], rows[b, h] = o[..., :dim], o[..., dim:]
        ctx.save_for_backward(q, k, v, out, rows, lse, bias)
        ctx.spec, ctx.scale = spec, scale
        return out, pool_rows(rows, spec)

    @staticmethod
    def backward(ctx, dout, dpooled):
        q, k, v, out, rows, lse, bias = ctx.saved_tensors
        spec: PoolSpec = ctx.spec
        batch, heads, queries, dim = q.shape
        n_tok = spec.num_tokens
        k_aug, v_aug = augment_keys_values(k, v, spec.tokens)
        drows = unpool_rows(dpooled, spec).to(q.dtype).expand(batch, heads, queries, n_tok)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for b, h in _chunks(batch, heads, queries * (dim + n_tok)):
            gq, gk, gv = _FLASH_CPU_BACKWARD(
                torch.cat([dout[b, h], drows[b, h]], dim=-1),
                F.pad(q[b, h], (0, n_tok)),
                k_aug[b, h],
                v_aug[b, h],
                torch.cat([out[b, h], rows[b, h]], dim=-1),
                lse[b, h],
                0.0,
                False,
                attn_mask=_rows(bias, b),
                scale=ctx.scale,
            )
            dq[b, h], dk[b, h], dv[b, h] = gq[..., :dim], gk[..., :dim], gv[..., :dim]
        return dq, dk, dv, None, None, None


def _rows(bias: torch.Tensor | None, b: slice) -> torch.Tensor | None:
    return None if bias is None else bias[b]


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
    o = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=bias, scale=scale)
    return o[..., :dim], pool_rows(o[..., dim:], spec)
