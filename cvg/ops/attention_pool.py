"""`attention_pool`: cross-attention that also returns pooled attention maps of a few key tokens.

One public entry point, input checks with one-line errors, and dispatch to the backends:
`naive` (materialises P; the reference), `torch` (stock fused attention, any device) and
`triton` (fused GPU kernels; on CPU only under TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cvg.ops.attention_pool_naive import attention_pool_naive
from cvg.ops.attention_pool_torch import attention_pool_torch
from cvg.ops.pooling import PoolSpec, make_pool_spec


@dataclass(frozen=True)
class Backend:
    """One way to run the op, with what it needs (the pattern of diffusers' attention dispatcher):
    `refusal(q)` is None when it can run on these inputs, else the error saying why in one line."""

    name: str
    run: Callable  # (q, k, v, spec, scale, bias [B, M] or None) -> (out, pooled)
    refusal: Callable[[torch.Tensor], Exception | None]
    automatic: bool  # whether `auto` may pick it


def _triton_refusal(q: torch.Tensor) -> Exception | None:
    why = "attention_pool: backend 'triton'"
    if importlib.util.find_spec("triton") is None:
        return RuntimeError(f"{why} needs the triton package (pip install cvg[triton])")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return RuntimeError(
            f"{why} needs CUDA tensors (got {q.device.type}); on CPU set TRITON_INTERPRET=1 "
            "before importing cvg.kernels"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return TypeError(f"{why} supports float16, bfloat16 and float32, got {q.dtype}")
    if q.shape[-1] > 128:
        return ValueError(f"{why} supports head dims up to 128, got {q.shape[-1]}")
    return None


def _run_triton(q, k, v, spec, scale, bias):
    from cvg.kernels.attention_pool import attention_pool_triton

    return attention_pool_triton(q, k, v, spec, scale, bias)


def _per_query_bias(run: Callable) -> Callable:
    """The torch-level backends take the bias broadcast over heads and queries: `[B, 1, 1, M]`."""
    return lambda q, k, v, spec, scale, bias: run(q, k, v, spec, scale, None if bias is None else bias[:, None, None])


# In `auto`'s order: the first automatic backend whose refusal is None runs. Triton on CPU (the
# interpreter) is for tests only, so `auto` takes it on CUDA alone.
REGISTRY = {
    "triton": Backend("triton", _run_triton, _triton_refusal, automatic=True),
    "torch": Backend("torch", _per_query_bias(attention_pool_torch), lambda q: None, automatic=True),
    "naive": Backend("naive", _per_query_bias(attention_pool_naive), lambda q: None, automatic=False),
}
BACKENDS = ("auto", *REGISTRY)


def attention_pool(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: torch.Tensor,
    tokens: torch.Tensor | list[int],
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    keep_heads: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention from N queries to M keys, plus pooled maps of the selected key tokens.

    Args:
        q: `[B, H, N, D]` queries (video tokens).
        k, v: `[B, H, M, D]` keys and values (text tokens).
        groups: `[N]` integer tile of each query, in `[0, num_groups)`; see `grid_groups`.
        tokens: `[T]` integer key indices whose attention is pooled (repeats allowed).
        scale: softmax scale, default `1/sqrt(D)`.
        key_padding_mask: `[B, M]` bool, True where a key is padding and must be ignored
            (the `torch.nn.MultiheadAttention` convention; pass `~attention_mask.bool()` for a
            Hugging Face tokenizer mask).
        key_bias: `[B, M]` finite float added to every query's score of each key (natural-log
            units; see `cvg.models.padding`: n identical keys weigh as one with `log n` added). Constant:
            no gradient flows to it.
        num_groups: tile count G, default `groups.max() + 1`.
        keep_heads: return `[B, H, G, T]` per-head maps instead of their mean over heads.
        backend: one of `BACKENDS`; `auto` is `triton` on CUDA when Triton imports, else `torch`.

    Returns:
        `out [B, H, N, D]`, equal to `softmax(q kᵀ·scale + key_bias) v`, and `pooled [B, G, T]` (or
        `[B, H, G, T]`): the mean over heads and over the queries of each tile of
        `softmax(q kᵀ·scale + key_bias)[..., tokens]`. Tiles with no query pool to 0. Both are differentiable
        with respect to q, k and v.
    """
    groups, tokens, num_groups = _check_inputs(q, k, v, groups, tokens, key_padding_mask, key_bias, num_groups)
    dim = q.shape[-1]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"attention_pool: scale must be finite, got {scale}")
    spec = make_pool_spec(groups, tokens, num_groups, q.shape[1], keep_heads)
    return attention_pool_with_spec(
        q, k, v, spec, scale, key_padding_mask=key_padding_mask, key_bias=key_bias, backend=backend
    )


def attention_pool_with_spec(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: PoolSpec,
    scale: float,
    *,
    key_padding_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_pool` with the pooling made once beforehand (`make_pool_spec`) and inputs already checked:
    nothing here reads tensor data on the host, so a call makes no host synchronisation and can be
    captured in a CUDA graph. Recording processors call it with a spec made per video grid."""
    chosen = resolve_backend(backend, q)
    bias = None  # one additive [B, M] score bias: the key bias, -inf at masked keys
    if key_padding_mask is not None or key_bias is not None:  # float32 at least: log-count biases stay exact
        wide = torch.promote_types(q.dtype, torch.float32)
        bias = torch.zeros((q.shape[0], k.shape[2]), dtype=wide, device=q.device)
        bias = bias if key_bias is None else bias + key_bias.detach()
        bias = bias if key_padding_mask is None else bias.masked_fill(key_padding_mask, float("-inf"))
    return chosen.run(q, k, v, spec, scale, bias)


def resolve_backend(backend: str, q: torch.Tensor) -> Backend:
    """The named backend, refused in one line if it cannot run on `q`; `auto`: the first automatic one
    that can (Triton only on CUDA)."""
    if backend == "auto":
        # Triton's CPU interpreter is for tests: on CPU `auto` does not even look for it.
        candidates = [b for b in REGISTRY.values() if b.automatic and (b.name != "triton" or q.device.type == "cuda")]
        return next(b for b in candidates if b.refusal(q) is None)
    if backend not in REGISTRY:
        raise ValueError(f"attention_pool: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    chosen = REGISTRY[backend]
    if (error := chosen.refusal(q)) is not None:
        raise error
    return chosen


def _check_inputs(q, k, v, groups, tokens, key_padding_mask, key_bias, num_groups):
    """Validate shapes, dtypes, devices and index ranges; return int64 groups/tokens and G."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention_pool: {name} must be a 4-D tensor [B, H, L, D], got {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"attention_pool: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention_pool: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention_pool: q, k, v devices differ ({q.device}, {k.device}, {v.device})")
    batch, heads, queries, dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[-1] != dim:
        raise ValueError(
            f"attention_pool: expected k and v of shape [{batch}, {heads}, M, {dim}] to match q "
            f"{tuple(q.shape)}, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    keys = k.shape[2]
    if min(batch, heads, queries, keys, dim) == 0:
        raise ValueError(f"attention_pool: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    groups = _index_tensor("groups", groups, q.device)
    tokens = _index_tensor("tokens", tokens, q.device)
    if groups.numel() != queries:
        raise ValueError(f"attention_pool: groups has {groups.numel()} entries, expected one per query ({queries})")
    if tokens.numel() == 0:
        raise ValueError("attention_pool: tokens is empty; select at least one key token to pool")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, keys):
            raise ValueError(
                f"attention_pool: key_padding_mask must be a bool tensor of shape [{batch}, {keys}], got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention_pool: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if key_bias is not None:
        if not key_bias.is_floating_point() or tuple(key_bias.shape) != (batch, keys):
            raise ValueError(
                f"attention_pool: key_bias must be a float tensor of shape [{batch}, {keys}], got {key_bias.dtype} "
                f"{tuple(key_bias.shape)}"
            )
        if key_bias.device != q.device:
            raise ValueError(f"attention_pool: key_bias is on {key_bias.device}, q on {q.device}")
    if torch.compiler.is_compiling():
        return groups, tokens, _checked_in_graph(groups, tokens, keys, key_padding_mask, key_bias, num_groups)
    if groups.min() < 0:
        raise ValueError(f"attention_pool: groups has a negative tile index ({int(groups.min())})")
    needed = int(groups.max()) + 1
    num_groups = needed if num_groups is None else int(num_groups)
    if num_groups < needed:
        raise ValueError(f"attention_pool: groups uses tile {needed - 1} but num_groups is {num_groups}")
    if tokens.min() < 0 or tokens.max() >= keys:
        raise ValueError(f"attention_pool: tokens must index keys in [0, {keys}), got {tokens.min()}..{tokens.max()}")
    if key_padding_mask is not None and (fully_masked := key_padding_mask.all(dim=1)).any():
        raise ValueError(
            f"attention_pool: key_padding_mask masks every key of batch item {int(fully_masked.nonzero()[0])}"
        )
    if key_bias is not None and not torch.isfinite(key_bias).all():
        raise ValueError("attention_pool: key_bias has non-finite values; mask keys with key_padding_mask")
    return groups, tokens, num_groups


def _checked_in_graph(groups, tokens, keys, key_padding_mask, key_bias, num_groups) -> int:
    """Under torch.compile, the value checks run inside the graph (no host read, no graph break); the
    tile count cannot be read from `groups` there, so it must be given."""
    if num_groups is None:
        raise ValueError("attention_pool: under torch.compile give num_groups (grid_groups returns the tiles)")
    torch._assert_async(((groups >= 0) & (groups < num_groups)).all(), "attention_pool: groups outside [0, G)")
    torch._assert_async(((tokens >= 0) & (tokens < keys)).all(), "attention_pool: tokens outside [0, M)")
    if key_padding_mask is not None:
        torch._assert_async(~key_padding_mask.all(dim=1).any(), "attention_pool: every key masked")
    if key_bias is not None:
        torch._assert_async(torch.isfinite(key_bias).all(), "attention_pool: key_bias has non-finite values")
    return int(num_groups)


def _index_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if not isinstance(value, torch.Tensor) and t.numel() == 0:
        t = t.long()  # an empty Python list carries no dtype
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"attention_pool: {name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.int64)


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
