"""Triton kernels of `attention_pool` and their autograd wrapper (forward kernel here, backward kernels in
attention_pool_backward.py, shared helpers in attention_pool_common.py).

Forward (one program per query block and (batch, head)): flash-attention online softmax over the
keys gives `out` and the log-sum-exp; then the probabilities of the T selected keys are recomputed
from the log-sum-exp (one [BLOCK_N, T] dot) and added straight into the pooled maps with atomics,
so no per-query map is ever written.

Backward recomputes P from the saved log-sum-exp. The pooled gradient enters as rows
`G[i, t] = dpooled[g(i), t] · w_i` on the selected columns: `dP = dout vᵀ + G Eᵀ` with E the one-hot
[keys, T] matrix of the selected tokens, and the softmax row term
`delta_i = rowsum(dout ∘ out)_i + Σ_t P[i, tokens[t]] G[i, t]`. Three kernels: delta, dk/dv (one
program per key block) and dq (one program per query block); no atomics in backward.

Scores live in the base-2 domain (`qk_scale = scale · log2 e`), as in Triton's fused-attention tutorial.
Masked and out-of-range keys score `NEG_BIG` (finite, so a fully masked key block cannot make NaNs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from cvg.kernels.attention_pool_backward import _attn_pool_bwd_delta, _attn_pool_bwd_dkdv, _attn_pool_bwd_dq
from cvg.kernels.attention_pool_common import (
    LOG2E,
    MASKED_SCORE,
    _block,
    _next_pow2,
    _pooled_base,
    _scores,
    _selected_probs,
    default_configs,
    dot_precision,
)

from cvg.ops.pooling import PoolSpec


@triton.jit
def _attn_pool_fwd(
    Q,
    K,
    V,
    Bias,
    Tok,
    Groups,
    QWeight,
    Out,
    Lse,
    Pooled,
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
    BLOCK_M: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    n_valid = offs_n < N
    d_valid = offs_d < D
    q_base = b * stride_qb + h * stride_qh
    k_base = b * stride_kb + h * stride_kh
    bias_base = b * M
    q_offs, q_mask = _block(q_base, offs_n, stride_qn, N, offs_d, d_valid)
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for start in range(0, M, BLOCK_M):
        cols = start + offs_m
        m_valid = cols < M
        kv_offs, kv_mask = _block(k_base, cols, stride_kn, M, offs_d, d_valid)
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
        s = _scores(q, k, Bias, bias_base, cols, m_valid, qk_scale, HAS_MASK, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    lse2 = m_i + tl.log2(l_i)
    out = acc / l_i[:, None]
    tl.store(Out + q_offs, out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + pid_bh * N + offs_n, lse2, mask=n_valid)

    p_sel = _selected_probs(
        q,
        K,
        Tok,
        Bias,
        k_base,
        bias_base,
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
    g = tl.load(Groups + offs_n, mask=n_valid, other=0)
    w = tl.load(QWeight + offs_n, mask=n_valid, other=0.0)
    offs_t = tl.arange(0, T_PAD)
    pooled_base = _pooled_base(pid_bh, b, G, T, KEEP_HEADS)
    dst = Pooled + pooled_base + g[:, None] * T + offs_t[None, :]
    tl.atomic_add(dst, p_sel * w[:, None], mask=n_valid[:, None] & (offs_t[None, :] < T))


class _Launch:
    """What every kernel launch of one call shares: index tensors, strides, sizes, constexprs."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, spec: PoolSpec, bias: torch.Tensor | None, scale: float):
        batch, heads, queries, dim = q.shape
        self.batch_heads, self.queries, self.keys = batch * heads, queries, k.shape[2]
        self.configs = default_configs(_next_pow2(dim), q.dtype)
        has_mask = bias is not None
        bias = bias if has_mask else q.new_empty(1, dtype=torch.float32)
        self.index_args = (bias, spec.tokens.to(torch.int32), spec.groups.to(torch.int32), spec.query_weight.float())
        self.shape_args = (*q.stride()[:3], *k.stride()[:3], heads, queries, self.keys, spec.num_groups)
        self.qk_scale, self.scale = scale * LOG2E, scale
        self.meta = dict(
            D=dim,
            D_PAD=_next_pow2(dim),
            T=spec.num_tokens,
            T_PAD=_next_pow2(spec.num_tokens),
            KEEP_HEADS=spec.keep_heads,
            HAS_MASK=has_mask,
            DOT_PRECISION=dot_precision(q.dtype),
        )

    def __call__(self, kernel, name: str, head: tuple, tail: tuple, scales: tuple, over_keys: bool = False) -> None:
        """Launch `kernel(*head, *index_args, *tail, *shape_args, *scales)` on its default config."""
        cfg = self.configs[name]
        blocks = {"BLOCK_N": cfg.block_n} if name == "bwd_delta" else {"BLOCK_N": cfg.block_n, "BLOCK_M": cfg.block_m}
        rows, block = (self.keys, cfg.block_m) if over_keys else (self.queries, cfg.block_n)
        kernel[(triton.cdiv(rows, block), self.batch_heads)](
            *head,
            *self.index_args,
            *tail,
            *self.shape_args,
            *scales,
            **self.meta,
            **blocks,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


class _TritonAttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, spec: PoolSpec, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, queries, _ = q.shape
        launch = _Launch(q, k, spec, bias, scale)
        out = torch.empty_like(q)
        lse = q.new_empty(batch, heads, queries, dtype=torch.float32)
        pooled = q.new_zeros(
            batch * heads if spec.keep_heads else batch, spec.num_groups, spec.num_tokens, dtype=torch.float32
        )
        launch(_attn_pool_fwd, "fwd", (q, k, v), (out, lse, pooled), (launch.qk_scale,))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.launch = launch
        shape = (batch, heads) if spec.keep_heads else (batch,)
        return out, pooled.view(*shape, spec.num_groups, spec.num_tokens).to(q.dtype)

    @staticmethod
    def backward(ctx, dout, dpooled):
        q, k, v, out, lse = ctx.saved_tensors
        launch: _Launch = ctx.launch
        dout = dout.contiguous()
        dpooled = dpooled.to(torch.float32).contiguous()
        delta = torch.empty_like(lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scales = (launch.qk_scale, launch.scale)
        launch(_attn_pool_bwd_delta, "bwd_delta", (q, k), (out, dout, lse, dpooled, delta), scales[:1])
        launch(_attn_pool_bwd_dkdv, "bwd_dkdv", (q, k, v), (dout, lse, dpooled, delta, dk, dv), scales, True)
        launch(_attn_pool_bwd_dq, "bwd_dq", (q, k, v), (dout, lse, dpooled, delta, dq), scales)
        return dq, dk, dv, None, None, None


def attention_pool_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PoolSpec,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs are checked by `cvg.ops.attention_pool`; this only adapts them to the kernels. `bias`: the
    additive `[B, M]` score bias in natural-log units, -inf at masked keys."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention_pool: backend 'triton' supports float16, bfloat16 and float32, got {q.dtype}")
    if q.shape[-1] > 128:
        raise ValueError(f"attention_pool: backend 'triton' supports head dims up to 128, got {q.shape[-1]}")
    if bias is not None:  # the kernels' scores are base 2; a finite floor keeps fully masked blocks NaN-free
        bias = (bias.float() * LOG2E).clamp_min(MASKED_SCORE).contiguous()
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # The interpreter's tl.dot multiplies raw bf16 bits: compute in float32 there.
        out, pooled = _TritonAttentionPool.apply(q.float(), k.float(), v.float(), bias, spec, scale)
        return out.to(q.dtype), pooled.to(q.dtype)
    return _TritonAttentionPool.apply(q, k, v, bias, spec, scale)
