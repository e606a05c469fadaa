"""The portable backend: stock fused attention, no [B, H, N, M] tensor in forward or backward.

Pooled maps are attention whose values are one-hot columns of the selected tokens, so one attention
call over `v_aug = [v | onehot(tokens)]` returns `[out | P[..., tokens]]`. q and k are zero-padded to
the same width because SDPA's fused CPU and flash kernels need equal head dims.

On CPU, a custom op (`cvg::attention_pool_cpu`, its autograd registered beside it) calls the fused
kernel's forward, which also returns the log-sum-exp, so the selected columns come from one small
[N, T] product and forward needs no augmented width. Its backward op (`cvg::attention_pool_cpu_backward`)
runs the fused kernel's backward at the plain head dim, chunk by chunk of queries in float32. The maps'
gradient enters softmax's backward `dS = P ∘ (dP - rowsum(P ∘ dP))` through two terms: the row sums,
folded into the `out` the kernel reads (it uses `out` for nothing else), and `P ∘ E` at the T selected
columns (two [N, T] products added after the call). A chunk with a row that has a map gradient but no
output gradient to fold into runs the kernel on the augmented tensors instead. Saved for backward: q, k,
v, out, the log-sum-exp, and in half precision the selected columns. torch.compile and torch.export see
the two ops, not their insides (`register_fake` gives their shapes).

Elsewhere, autograd through one augmented `scaled_dot_product_attention` call keeps the
O(B·H·N·(D+T)) bound.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from cvg.ops.pooling import PoolSpec, pool_rows, unpool_rows

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# One backward call per chunk of queries: about `_CHUNK_BYTES` of [B, H, rows, D], at least
# `_MIN_CHUNK_ROWS` rows (the fused kernel's large query blocks start at 768; 256-row chunks ran 1.5x
# slower). The chunk bounds the backward's transient copies. Half precision runs one call: its fused
# kernel pays per call (bf16 at N=16384, H=12, D=64: 1.29x SDPA in 1 MB chunks, 1.15x in two, 1.10x in
# one, measured in one run), and its copies are half the size.
_CHUNK_BYTES = {torch.float32: 1 << 20, torch.float64: 1 << 20}
_MIN_CHUNK_ROWS = 768
_CACHED_ELEMENTS = 1 << 18  # a float32 chunk that stays in a core's cache (1 MB)


def augment_keys_values(k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k zero-padded by T columns; v with one-hot columns of `tokens` appended. Both `[B, H, M, D+T]`."""
    batch, heads, keys, _ = v.shape
    # [M, T]; not F.one_hot, which checks its indices on the host on CPU: the step stays free of host reads
    onehot = (torch.arange(keys, device=tokens.device)[:, None] == tokens[None, :]).to(v.dtype)
    v_aug = torch.cat([v, onehot.expand(batch, heads, keys, tokens.numel())], dim=-1)
    return F.pad(k, (0, tokens.numel())), v_aug


def _query_chunks(batch: int, heads: int, queries: int, width: int, elements: int, min_rows: int) -> Iterator[slice]:
    """Query ranges of about `elements` elements over all batch items and heads (at least `min_rows`
    rows): the fused CPU backward parallelises over (batch, head), so every call keeps all of them."""
    rows = max(min_rows, elements // (batch * heads * width))
    for start in range(0, queries, rows):
        yield slice(start, min(start + rows, queries))


def selected_probs(
    q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    """`P[..., tokens]` from the log-sum-exp of each query row: `[B, H, N, T]` in float32 (or float64), no
    [N, M] tensor. The scores are formed in float32 as the fused kernel forms them: a half-precision score
    of size 1e3 is off by up to 4 (bf16), and exp() of that error is no probability at all. Queries are
    widened a chunk at a time, which stays in cache (half the time of widening q at once, measured)."""
    batch, heads, queries, dim = q.shape
    wide = torch.promote_types(q.dtype, torch.float32)
    keys = k[:, :, tokens].to(wide).transpose(-1, -2)
    scores = q.new_empty((batch, heads, queries, tokens.numel()), dtype=wide)
    for n in _query_chunks(batch, heads, queries, dim, _CACHED_ELEMENTS, 1):
        torch.matmul(q[:, :, n].to(wide), keys, out=scores[:, :, n])
    scores = scores.mul_(scale)
    if bias is not None:
        scores = scores.add_(bias[..., tokens])
    return scores.sub_(lse[..., None]).exp_()


# The fused CPU path as two torch.library custom ops over plain tensors and ints (flash-attention's
# pattern): torch.compile and torch.export see one op each way, with fake shapes, instead of tracing into
# the kernel calls. Autograd is registered on the forward op; the backward op is what it calls.


@torch.library.custom_op("cvg::attention_pool_cpu", mutates_args=(), device_types="cpu")
def attention_pool_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    groups: torch.Tensor,
    tokens: torch.Tensor,
    query_weight: torch.Tensor,
    num_groups: int,
    keep_heads: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(out [B, H, N, D], pooled [B, G, T] or [B, H, G, T], lse [B, H, N], rows [B, H, N, T])`: rows are
    `P[..., tokens]` in float32 (float64 for float64), kept for backward in half precision; bias `[B, 1, 1, M]`
    or None."""
    spec = PoolSpec(groups, tokens, query_weight, num_groups, q.shape[1], keep_heads)
    # Forward needs no augmented width: the fused kernel's log-sum-exp gives the selected columns.
    out, lse = _FLASH_CPU(q, k, v, attn_mask=bias, scale=scale)
    rows = selected_probs(q, k, tokens, bias, lse, scale)
    return out, pool_rows(rows, spec).to(q.dtype), lse, rows  # pooled in float32, rounded once


@attention_pool_cpu.register_fake
def _(q, k, v, bias, groups, tokens, query_weight, num_groups, keep_heads, scale):
    batch, heads, queries, _ = q.shape
    pooled = (batch, heads, num_groups, tokens.shape[0]) if keep_heads else (batch, num_groups, tokens.shape[0])
    wide = torch.promote_types(q.dtype, torch.float32)
    # The fused kernel writes the log-sum-exp query-major: [B, N, H] memory seen as [B, H, N].
    lse = q.new_empty((batch, queries, heads), dtype=wide).transpose(1, 2)
    rows = q.new_empty((batch, heads, queries, tokens.shape[0]), dtype=wide)
    return torch.empty_like(q), q.new_empty(pooled), lse, rows


@torch.library.custom_op("cvg::attention_pool_cpu_backward", mutates_args=(), device_types="cpu")
def attention_pool_cpu_backward(
    dout: torch.Tensor,
    dpooled: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: torch.Tensor,
    tokens: torch.Tensor,
    query_weight: torch.Tensor,
    num_groups: int,
    keep_heads: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dv)`: the fused kernel's backward, chunk by chunk of queries. `rows` (the selected columns)
    are formed again per chunk when not kept (None)."""
    spec = PoolSpec(groups, tokens, query_weight, num_groups, q.shape[1], keep_heads)
    batch, heads, queries, dim = q.shape
    drows = unpool_rows(dpooled.to(lse.dtype), spec)
    k_tokens, augmented = k[:, :, tokens], None
    dq = torch.empty_like(q)
    dk, dv, dk_tokens = (torch.zeros(t.shape, dtype=lse.dtype) for t in (k, v, k_tokens))
    elements = _CHUNK_BYTES[q.dtype] // q.element_size() if q.dtype in _CHUNK_BYTES else q.numel()
    for n in _query_chunks(batch, heads, queries, dim, elements, _MIN_CHUNK_ROWS):
        q_n, dout_n, out_n, lse_n, drows_n = q[:, :, n], dout[:, :, n], out[:, :, n], lse[:, :, n], drows[:, :, n]
        rows_n = selected_probs(q_n, k, tokens, bias, lse_n, scale) if rows is None else rows[:, :, n]
        # The maps' share of softmax's row sums rowsum(P ∘ dP), folded into the `out` the kernel reads
        # for nothing else; P ∘ E at the selected columns is added after the call.
        row_sums = torch.linalg.vecdot(rows_n, drows_n)
        folded = _fold_row_sums(out_n, dout_n, row_sums)
        if folded is None:  # a row with a map gradient and no output gradient: augmented tensors
            augmented = augmented or augment_keys_values(k, v, tokens)
            gq, gk, gv = _FLASH_CPU_BACKWARD(
                torch.cat([dout_n, drows_n.expand_as(rows_n).to(q.dtype)], dim=-1),
                F.pad(q_n, (0, spec.num_tokens)),
                *augmented,
                torch.cat([out_n, rows_n.to(q.dtype)], dim=-1),
                lse_n,
                0.0,
                False,
                attn_mask=bias,
                scale=scale,
            )
            gq, gk, gv = gq[..., :dim], gk[..., :dim], gv[..., :dim]
        else:
            gq, gk, gv = _FLASH_CPU_BACKWARD(dout_n, q_n, k, v, folded, lse_n, 0.0, False, attn_mask=bias, scale=scale)
            if folded is not out_n:  # the chunk has a map gradient
                # P ∘ E's own terms, in the inputs' dtype: half-precision matmuls accumulate in float32.
                weights = (rows_n * drows_n * scale).to(q.dtype)
                gq = gq.add_(weights @ k_tokens)
                dk_tokens += weights.transpose(-1, -2) @ q_n
        dq[:, :, n] = gq
        dk += gk
        dv += gv
        del gq, gk, gv  # free before the next chunk's call, not after it
    return dq, dk.index_add_(2, tokens, dk_tokens).to(k.dtype), dv.to(v.dtype)


@attention_pool_cpu_backward.register_fake
def _(dout, dpooled, q, k, v, out, lse, rows, bias, groups, tokens, query_weight, num_groups, keep_heads, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fold_row_sums(out: torch.Tensor, dout: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor | None:
    """`out'` with rowsum(dout ∘ out') = rowsum(dout ∘ out) + row_sums, by adding row_sums / |dout|² · dout
    to each row: `out` itself when no row has a row sum. None where a row with a row sum has no output
    gradient to carry it (a block whose output the loss does not read), or the fold would overflow."""
    if not row_sums.any():
        return out
    norms = torch.linalg.vecdot(dout, dout).to(row_sums.dtype)  # in dout's dtype: 4x faster than widening
    carried = torch.where(row_sums == 0, 0.0, row_sums.abs() * norms.rsqrt())  # largest entry added
    if not (carried <= torch.finfo(dout.dtype).max / 4).all():
        return None
    coefficient = torch.where(row_sums == 0, 0.0, row_sums / norms).to(dout.dtype)
    return torch.addcmul(out, dout, coefficient[..., None])


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, groups, tokens, query_weight, num_groups, keep_heads, scale = inputs
    out, _, lse, rows = output
    # Kept where forming them again means widening q (half precision); else formed again per chunk of
    # backward, which holds one [B, H, N, T] tensor less (a float32 [N, T] product is cheap).
    rows = rows if rows.dtype != q.dtype else None
    ctx.save_for_backward(q, k, v, out, lse, rows, bias, groups, tokens, query_weight)
    ctx.num_groups, ctx.keep_heads, ctx.scale = num_groups, keep_heads, scale


def _backward(ctx, dout, dpooled, _dlse, _drows):
    q, k, v, out, lse, rows, bias, groups, tokens, query_weight = ctx.saved_tensors
    dq, dk, dv = attention_pool_cpu_backward(
        dout,
        dpooled,
        q,
        k,
        v,
        out,
        lse,
        rows,
        bias,
        groups,
        tokens,
        query_weight,
        ctx.num_groups,
        ctx.keep_heads,
        ctx.scale,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


attention_pool_cpu.register_autograd(_backward, setup_context=_setup_context)


def attention_pool_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PoolSpec,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.device.type == "cpu":
        out, pooled, _, _ = attention_pool_cpu(
            q, k, v, bias, spec.groups, spec.tokens, spec.query_weight, spec.num_groups, spec.keep_heads, scale
        )
        return out, pooled
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
