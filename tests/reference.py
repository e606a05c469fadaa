"""Random attention_pool problems and their comparison against the float64 naive reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from cvg import attention_pool


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


def run(problem: Problem, backend: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Outputs and q/k/v gradients of one backend, for fixed random output gradients, in float64."""
    p = problem
    q, k, v = (t.to(dtype).requires_grad_() for t in (p.q, p.k, p.v))
    out, pooled = attention_pool(
        q, k, v, p.groups, p.tokens, key_padding_mask=p.mask, keep_heads=p.keep_heads, num_groups=p.num_groups,
        backend=backend,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1234)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    dpooled = torch.randn(pooled.shape, generator=gen, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad((out, pooled), (q, k, v), (dout.to(dtype), dpooled.to(dtype)))
    return {name: t.detach().double() for name, t in zip(NAMES, (out, pooled, dq, dk, dv), strict=True)}


NAMES = ("out", "pooled", "dq", "dk", "dv")


def relative_errors(actual: dict, expected: dict) -> dict[str, float]:
    """max|a - e| / max|e| per tensor. A gradient that is zero in exact arithmetic (dq and dk when a single key
    is attended, where softmax is constant) is measured against the largest gradient of the problem instead."""
    grad_scale = max(expected[n].abs().max().item() for n in ("dq", "dk", "dv"))
    errors = {}
    for name in NAMES:
        scale = expected[name].abs().max().item()
        if name.startswith("d") and scale <= 1e-9 * grad_scale:
            scale = grad_scale
        errors[name] = (actual[name] - expected[name]).abs().max().item() / max(scale, 1e-300)
    return errors


def assert_matches_reference(problem: Problem, backend: str, dtype: torch.dtype, tol: float) -> None:
    errors = relative_errors(run(problem, backend, dtype), run(problem, "naive", torch.float64))
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{backend} {dtype}: relative errors above {tol}: {bad} for {problem}"
