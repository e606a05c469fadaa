"""Triton kernels of `attention_pool` and their autograd wrapper.

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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cvg.ops.pooling import PoolSpec

MASKED_SCORE = -1.0e30
NEG_BIG = tl.constexpr(MASKED_SCORE)  # jit functions may only read constexpr globals
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    block_n: int  # queries per block
    block_m: int  # keys per block
    num_warps: int
    num_stages: int


# (block_n queries, block_m keys, warps, stages), chosen so that `python -m cvg.kernels.check` reports
# no spills on sm_80 and sm_90; float32 (3xTF32 dots) needs smaller tiles for its split operands.
KERNEL_NAMES = ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq")
_CONFIGS = {  # per kernel, in KERNEL_NAMES order
    ("half", 64): ((128, 64, 8, 3), (64, 64, 4, 1), (64, 32, 4, 2), (64, 32, 4, 2)),
    ("half", 128): ((128, 64, 8, 2), (64, 64, 4, 1), (64, 32, 4, 1), (64, 32, 4, 1)),
    ("float32", 64): ((64, 32, 4, 1), (64, 32, 8, 1), (32, 32, 4, 1), (32, 32, 4, 1)),
    ("float32", 128): ((16, 32, 8, 1), (32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)),
}


def default_configs(head_dim_padded: int, dtype: torch.dtype) -> dict[str, KernelConfig]:
    """Launch configs per kernel; `python -m cvg.kernels.check` compiles exactly these."""
    kind = "float32" if dtype == torch.float32 else "half"
    size = 64 if head_dim_padded <= 64 else 128
    return {name: KernelConfig(*cfg) for name, cfg in zip(KERNEL_NAMES, _CONFIGS[kind, size], strict=True)}


@triton.jit
def _selected_probs(
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
    T: tl.constexpr,
    T_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """P[rows, tokens[t]] for one query block, from its base-2 log-sum-exp: [BLOCK_N, T_PAD]."""
    offs_t = tl.arange(0, T_PAD)
    t_valid = offs_t < T
    tok = tl.load(Tok + offs_t, mask=t_valid, other=0)
    k_sel = tl.load(
        K + k_base + tok[:, None] * stride_kn + offs_d[None, :], mask=t_valid[:, None] & d_valid[None, :], other=0.0
    )
    s = tl.dot(q, tl.trans(k_sel), input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        s += tl.load(Bias + bias_base + tok, mask=t_valid, other=NEG_BIG)[None, :]
    p = tl.exp2(s - lse2[:, None])
    return tl.where(t_valid[None, :], p, 0.0)


@triton.jit
def _scores(q, k, Bias, bias_base, cols, m_valid, qk_scale, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Base-2 scores of a [BLOCK_N, BLOCK_M] block; masked and out-of-range keys get NEG_BIG."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        s += tl.load(Bias + bias_base + cols, mask=m_valid, other=NEG_BIG)[None, :]
    else:
        s = tl.where(m_valid[None, :], s, NEG_BIG)
    return s


@triton.jit
def _onehot_tokens(Tok, cols, T: tl.constexpr, T_PAD: tl.constexpr):
    """E[t, j] = 1 where tokens[t] == cols[j]: [T_PAD, BLOCK_M] float32."""
    offs_t = tl.arange(0, T_PAD)
    tok = tl.load(Tok + offs_t, mask=offs_t < T, other=-1)
    return tl.where(tok[:, None] == cols[None, :], 1.0, 0.0)


@triton.jit
def _pooled_grad_rows(
    DPooled,
    Groups,
    QWeight,
    offs_n,
    n_valid,
    dpooled_base,
    offs_t,
    T: tl.constexpr,
):
    """G[i, t] = dpooled[g(i), t] · w_i for one query block: [BLOCK_N, T_PAD] float32."""
    g = tl.load(Groups + offs_n, mask=n_valid, other=0)
    w = tl.load(QWeight + offs_n, mask=n_valid, other=0.0)
    rows = tl.load(
        DPooled + dpooled_base + g[:, None] * T + offs_t[None, :],
        mask=n_valid[:, None] & (offs_t[None, :] < T),
        other=0.0,
    )
    return rows * w[:, None]


@triton.jit
def _pooled_base(pid_bh, b, G, T: tl.constexpr, KEEP_HEADS: tl.constexpr):
    """Offset of this program's [G, T] pooled maps: per (batch, head), or per batch when heads are averaged."""
    if KEEP_HEADS:
        return pid_bh * G * T
    return b * G * T


@triton.jit
def _block(base, rows, stride_row, length, offs_d, d_valid):
    """Offsets and mask of a [rows, D_PAD] block of a [length, D] matrix at `base`."""
    return base + rows[:, None] * stride_row + offs_d[None, :], (rows < length)[:, None] & d_valid[None, :]


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


def _next_pow2(x: int, floor: int = 16) -> int:
    """Block extents must be powers of two and `tl.dot` operands at least 16 wide."""
    return max(floor, 1 << (x - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use 3xTF32 products (float32 accuracy on tensor cores); half types use plain MMA."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


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
