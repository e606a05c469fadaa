"""The Triton backend under TRITON_INTERPRET=1 (set in conftest) against the float64 naive reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_key_bias_counts_copies, assert_matches_reference, make_problem, problems

from cvg import attention_pool

pytest.importorskip("triton")


@settings(max_examples=60)
@given(problems(max_n=150, max_heads=2, head_dims=(16, 24, 32, 64)))
def test_triton_float32_matches_float64_naive(problem):
    assert_matches_reference(problem, "triton", torch.float32, 1e-4)


def test_triton_key_bias_weighs_a_key_as_its_copies():
    assert_key_bias_counts_copies("triton", torch.float32, 1e-4)


@pytest.mark.parametrize("keys", [1, 77, 512])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_required_key_counts(keys, masked):
    """M = 1, 77 and 512 always run, with odd N (no block multiple) and uneven tiles."""
    problem = make_problem(B=2, H=2, N=133, M=keys, D=32, T=16, G=9, masked=masked, keep_heads=False, seed=keys)
    assert_matches_reference(problem, "triton", torch.float32, 1e-4)


@given(st.integers(1, 16), st.booleans(), st.integers(0, 2**31 - 1))
@settings(max_examples=8)
def test_triton_token_counts_and_head_maps(tokens, keep_heads, seed):
    problem = make_problem(B=1, H=3, N=70, M=40, D=16, T=tokens, G=5, masked=True, keep_heads=keep_heads, seed=seed)
    assert_matches_reference(problem, "triton", torch.float32, 1e-4)


def test_triton_head_dim_128_float32():
    """The float32 D = 128 launch configs (small tiles, 8 warps) under the interpreter."""
    problem = make_problem(B=1, H=1, N=37, M=77, D=128, T=3, G=4, masked=True, keep_heads=False, seed=8)
    assert_matches_reference(problem, "triton", torch.float32, 1e-4)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_triton_half_precision(dtype, tol):
    """float16 runs the kernels in float16; bfloat16 is upcast on CPU (the interpreter's bf16 dot is wrong)."""
    problem = make_problem(B=1, H=2, N=90, M=77, D=64, T=4, G=6, masked=True, keep_heads=False, seed=2)
    assert_matches_reference(problem, "triton", dtype, tol)


@pytest.mark.parametrize(
    "dtype, head_dim, message",
    [(torch.float64, 16, "supports float16, bfloat16 and float32"), (torch.float32, 192, "head dims up to 128")],
)
def test_triton_refuses_what_it_does_not_compile_for(dtype, head_dim, message):
    p = make_problem(B=1, H=1, N=4, M=3, D=head_dim, T=1, G=1, masked=False, keep_heads=False, seed=0)
    with pytest.raises((TypeError, ValueError), match=message):
        attention_pool(p.q.to(dtype), p.k.to(dtype), p.v.to(dtype), p.groups, p.tokens, backend="triton")
