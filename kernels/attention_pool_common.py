"""What the attention_pool kernels share: launch configurations, the masked score, and the jit helpers
(scores in the base-2 domain, the selected columns' probabilities, the pooled gradient's rows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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


def _next_pow2(x: int, floor: int = 16) -> int:
    """Block extents must be powers of two and `tl.dot` operands at least 16 wide."""
    return max(floor, 1 << (x - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use 3xTF32 products (float32 accuracy on tensor cores); half types use plain MMA."""
    return "tf32x3" if dtype == torch.float32 else "tf32"
