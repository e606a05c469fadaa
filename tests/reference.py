"""Random attention_pool problems and their comparison against the float64 naive reference."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from cvg import attention_pool
from cvg.ops.pooling import make_pool_spec, unpool_rows


@dataclass
class Problem:
    q: torch.Tensor  # float64
    k: torch.Tensor
    v: torch.Tensor
    groups: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor | None
    keep_heads: bool
    num_groups: int

    def __repr__(self) -> str:
        mask = None if self.mask is None else self.mask.sum(1).tolist()
        return (
            f"Problem(q={tuple(self.q.shape)}, k={tuple(self.k.shape)}, tokens={self.tokens.tolist()}, "
            f"G={self.num_groups}, masked_per_batch={mask}, keep_heads={self.keep_heads})"
        )


def make_problem(B, H, N, M, D, T, G, masked, keep_heads, seed) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (N, M, M))
    # Uneven tiles: random assignment, and G may exceed the used tiles (empty tiles pool to 0).
    groups = torch.randint(0, G, (N,), generator=gen)
    tokens = torch.randint(0, M, (T,), generator=gen)
    mask = None
    if masked:
        mask = torch.rand(B, M, generator=gen) < 0.4
        mask[torch.arange(B), torch.randint(0, M, (B,), generator=gen)] = False  # one key kept per item
    return Problem(q, k, v, groups, tokens, mask, keep_heads, G)


@st.composite
def problems(draw, max_n: int = 160, max_heads: int = 3, keys=None, head_dims=(8, 16, 24, 32, 64)) -> Problem:
    keys = keys or st.one_of(st.sampled_from([1, 77, 512]), st.integers(2, 130))
    n = draw(st.integers(1, max_n))
    return make_problem(
        B=draw(st.integers(1, 2)),
        H=draw(st.integers(1, max_heads)),
        N=n,
        M=draw(keys),
        D=draw(st.sampled_from(head_dims)),
        T=draw(st.integers(1, 16)),
        G=draw(st.integers(1, n + 2)),
        masked=draw(st.booleans()),
        keep_heads=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run(
    problem: Problem, backend: str, dtype: torch.dtype, device: str = "cpu", key_bias: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Outputs and q/k/v gradients of one backend on `device`, for fixed random output gradients, in
    float64 on the CPU."""
    p = problem
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (p.q, p.k, p.v))
    out, pooled = attention_pool(
        q,
        k,
        v,
        p.groups.to(device),
        p.tokens.to(device),
        key_padding_mask=None if p.mask is None else p.mask.to(device),
        key_bias=None if key_bias is None else key_bias.to(device, dtype),
        keep_heads=p.keep_heads,
        num_groups=p.num_groups,
        backend=backend,
    )
    dout, dpooled = _output_gradients(out.shape, pooled.shape)
    dq, dk, dv = torch.autograd.grad((out, pooled), (q, k, v), (dout.to(device, dtype), dpooled.to(device, dtype)))
    return {name: t.detach().cpu().double() for name, t in zip(NAMES, (out, pooled, dq, dk, dv), strict=True)}


NAMES = ("out", "pooled", "dq", "dk", "dv")


def _output_gradients(out_shape, pooled_shape) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return (
        torch.randn(out_shape, generator=gen, dtype=torch.float64),
        torch.randn(pooled_shape, generator=gen, dtype=torch.float64),
    )


def summed_term_scales(p: Problem, pooled_shape) -> dict[str, float]:
    """For dq and dk, the size of the terms they sum: scale · (P ∘ (|dP| + |delta|)) @ |k| (and the transpose
    with |q|). dS = P ∘ (dP - delta) cancels, so rounding error scales with these terms, not with the sum:
    a gradient that is small by cancellation (or zero: softmax over one key) is judged against them."""
    batch, heads, _, dim = p.q.shape
    scale = dim**-0.5
    dout, dpooled = _output_gradients(p.q.shape, pooled_shape)
    scores = (p.q @ p.k.transpose(-1, -2)) * scale
    if p.mask is not None:
        scores = scores.masked_fill(p.mask[:, None, None, :], -torch.inf)
    probs = torch.softmax(scores, dim=-1)
    spec = make_pool_spec(p.groups, p.tokens, p.num_groups, heads, p.keep_heads)
    rows = unpool_rows(dpooled, spec).expand(*probs.shape[:3], p.tokens.numel())
    dprobs = dout @ p.v.transpose(-1, -2) + torch.zeros_like(probs).index_add_(-1, p.tokens, rows)
    delta = (probs * dprobs).sum(-1, keepdim=True)
    terms = probs * (dprobs.abs() + delta.abs())
    return {
        "dq": scale * (terms @ p.k.abs()).max().item(),
        "dk": scale * (terms.transpose(-1, -2) @ p.q.abs()).max().item(),
    }


def relative_errors(actual: dict, expected: dict, term_scales: dict[str, float] | None = None) -> dict[str, float]:
    """max|a - e| / max|e| per tensor; for dq and dk, / max(max|e|, size of the terms summed) when given."""
    errors = {}
    for name in NAMES:
        scale = max(expected[name].abs().max().item(), (term_scales or {}).get(name, 0.0))
        errors[name] = (actual[name] - expected[name]).abs().max().item() / max(scale, 1e-300)
    return errors


def assert_matches_reference(problem: Problem, backend: str, dtype: torch.dtype, tol: float) -> None:
    expected = run(problem, "naive", torch.float64)
    scales = summed_term_scales(problem, expected["pooled"].shape)
    errors = relative_errors(run(problem, backend, dtype), expected, scales)
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{backend} {dtype}: relative errors above {tol}: {bad} for {problem}"


def assert_key_bias_counts_copies(backend: str, dtype: torch.dtype, tol: float, copies: int = 7) -> None:
    """A key repeated `copies` times and the same key once with `log copies` added as key_bias give the
    same output, maps of the other tokens, dq, and (summed over the copies) dk and dv."""
    p = make_problem(B=2, H=2, N=45, M=9, D=16, T=3, G=5, masked=True, keep_heads=False, seed=23)
    p.mask[:, -1] = False  # the repeated key takes part
    q, k, v = (t.to(dtype) for t in (p.q, p.k, p.v))

    def repeat_last(t):
        return torch.cat([t, t[:, :, -1:].expand(-1, -1, copies - 1, -1)], dim=2)

    bias = torch.zeros(p.mask.shape, dtype=dtype)
    bias[:, -1] = math.log(copies)
    mask_full = torch.cat([p.mask, p.mask[:, -1:].expand(-1, copies - 1)], dim=1)
    runs = []
    for keys, values, mask, key_bias in ((repeat_last(k), repeat_last(v), mask_full, None), (k, v, p.mask, bias)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, keys, values))
        out, pooled = attention_pool(
            qq,
            kk,
            vv,
            p.groups,
            p.tokens % 8,
            key_padding_mask=mask,
            key_bias=key_bias,
            num_groups=p.num_groups,
            backend=backend,
        )
        dq, dk, dv = torch.autograd.grad(out.square().sum() + pooled.sum() * 5, (qq, kk, vv))
        dk, dv = (torch.cat([d[:, :, :8], d[:, :, 8:].sum(2, keepdim=True)], dim=2) for d in (dk, dv))
        runs.append((out, pooled, dq, dk, dv))
    for name, a, b in zip(("out", "pooled", "dq", "dk", "dv"), *runs, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
