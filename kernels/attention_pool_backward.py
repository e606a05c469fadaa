"""The backward kernels of attention_pool: delta (the softmax row term), dk/dv (one program per key
block) and dq (one program per query block); no atomics. See attention_pool.py for the maths."""

from __future__ import annotations

import triton
import triton.language as tl
from cvg.kernels.attention_pool_common import (
    _block,
    _onehot_tokens,
    _pooled_base,
    _pooled_grad_rows,
    _scores,
    _selected_probs,
)


@triton.jit
def _attn_pool_bwd_delta(
    Q,
    K,
    Bias,
    Tok,
    Groups,
    QWeight,
    Out,
    DOut,
    Lse,
    DPooled,
    Delta,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    H,
    N,
    M,
    G,
    qk_scale,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    T: tl.constexpr,
    T_PAD: tl.constexpr,
    KEEP_HEADS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """delta_i = rowsum(dout ∘ out)_i + Σ_t P[i, tokens[t]] G[i, t]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, T_PAD)
    n_valid = offs_n < N
    d_valid = offs_d < D
    q_offs, q_mask = _block(b * stride_qb + h * stride_qh, offs_n, stride_qn, N, offs_d, d_valid)
    o = tl.load(Out + q_offs, mask=q_mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + q_offs, mask=q_mask, other=0.0).to(tl.float32)
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    lse2 = tl.load(Lse + pid_bh * N + offs_n, mask=n_valid, other=0.0)
    p_sel = _selected_probs(
        q,
        K,
        Tok,
        Bias,
        b * stride_kb + h * stride_kh,
        b * M,
        lse2,
        stride_kn,
        qk_scale,
        offs_d,
        d_valid,
        T,
        T_PAD,
        HAS_MASK,
        DOT_PRECISION,
    )
    dpooled_base = _pooled_base(pid_bh, b, G, T, KEEP_HEADS)
    g_rows = _pooled_grad_rows(DPooled, Groups, QWeight, offs_n, n_valid, dpooled_base, offs_t, T)
    delta = tl.sum(o * do, 1) + tl.sum(p_sel * g_rows, 1)
    tl.store(Delta + pid_bh * N + offs_n, delta, mask=n_valid)


@triton.jit
def _attn_pool_bwd_dkdv(
    Q,
    K,
    V,
    Bias,
    Tok,
    Groups,
    QWeight,
    DOut,
    Lse,
    DPooled,
    Delta,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    H,
    N,
    M,
    G,
    qk_scale,
    scale,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    T: tl.constexpr,
    T_PAD: tl.constexpr,
    KEEP_HEADS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One key block: dv = Pᵀ dout, dk = scale · dSᵀ q, looping over all query blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, T_PAD)
    m_valid = cols < M
    d_valid = offs_d < D
    q_base = b * stride_qb + h * stride_qh
    kv_offs, kv_mask = _block(b * stride_kb + h * stride_kh, cols, stride_kn, M, offs_d, d_valid)
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    onehot = _onehot_tokens(Tok, cols, T, T_PAD).to(k.dtype)
    dpooled_base = _pooled_base(pid_bh, b, G, T, KEEP_HEADS)

    dk = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        q_offs, q_mask = _block(q_base, offs_n, stride_qn, N, offs_d, d_valid)
        q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
        do = tl.load(DOut + q_offs, mask=q_mask, other=0.0)
        lse2 = tl.load(Lse + pid_bh * N + offs_n, mask=n_valid, other=0.0)
        delta = tl.load(Delta + pid_bh * N + offs_n, mask=n_valid, other=0.0)
        s = _scores(q, k, Bias, b * M, cols, m_valid, qk_scale, HAS_MASK, DOT_PRECISION)
        p = tl.where(n_valid[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        g_rows = _pooled_grad_rows(DPooled, Groups, QWeight, offs_n, n_valid, dpooled_base, offs_t, T)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dp += tl.dot(g_rows.to(k.dtype), onehot, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    tl.store(DK + kv_offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_pool_bwd_dq(
    Q,
    K,
    V,
    Bias,
    Tok,
    Groups,
    QWeight,
    DOut,
    Lse,
    DPooled,
    Delta,
    DQ,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    H,
    N,
    M,
    G,
    qk_scale,
    scale,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    T: tl.constexpr,
    T_PAD: tl.constexpr,
    KEEP_HEADS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One query block: dq = scale · dS k, looping over all key blocks."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, T_PAD)
    n_valid = offs_n < N
    d_valid = offs_d < D
    q_offs, q_mask = _block(b * stride_qb + h * stride_qh, offs_n, stride_qn, N, offs_d, d_valid)
    k_base = b * stride_kb + h * stride_kh
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do = tl.load(DOut + q_offs, mask=q_mask, other=0.0)
    lse2 = tl.load(Lse + pid_bh * N + offs_n, mask=n_valid, other=0.0)
    delta = tl.load(Delta + pid_bh * N + offs_n, mask=n_valid, other=0.0)
    dpooled_base = _pooled_base(pid_bh, b, G, T, KEEP_HEADS)
    g_rows = _pooled_grad_rows(DPooled, Groups, QWeight, offs_n, n_valid, dpooled_base, offs_t, T).to(q.dtype)

    dq = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + offs_m
        m_valid = cols < M
        kv_offs, kv_mask = _block(k_base, cols, stride_kn, M, offs_d, d_valid)
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        s = _scores(q, k, Bias, b * M, cols, m_valid, qk_scale, HAS_MASK, DOT_PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dp += tl.dot(g_rows, _onehot_tokens(Tok, cols, T, T_PAD).to(q.dtype), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
