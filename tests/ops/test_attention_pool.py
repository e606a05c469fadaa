"""attention_pool: naive and torch backends against float64 references, gradients, and input errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import assert_key_bias_counts_copies, assert_matches_reference, make_problem, problems
from tolerance import ulps

from cvg import attention_pool
from cvg.ops.attention_pool import resolve_backend
from cvg.ops.attention_pool_torch import attention_pool_sdpa
from cvg.ops.pooling import make_pool_spec


@settings(max_examples=60)
@given(problems())
def test_torch_backend_float32_matches_float64_naive(problem):
    assert_matches_reference(problem, "torch", torch.float32, 1e-5)


@settings(max_examples=30)
@given(problems())
def test_naive_backend_float32_matches_float64_naive(problem):
    assert_matches_reference(problem, "naive", torch.float32, 1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_torch_backend_half_precision(dtype, tol):
    problem = make_problem(B=2, H=2, N=100, M=77, D=64, T=5, G=7, masked=True, keep_heads=False, seed=3)
    assert_matches_reference(problem, "torch", dtype, tol)


def _loop_reference(p):
    """The definition, written out with loops over batch, tile and token."""
    scores = (p.q @ p.k.transpose(-1, -2)) / p.q.shape[-1] ** 0.5
    if p.mask is not None:
        scores = scores.masked_fill(p.mask[:, None, None, :], -torch.inf)
    probs = torch.softmax(scores, dim=-1)
    B, H = p.q.shape[:2]
    pooled = torch.zeros(B, H, p.num_groups, p.tokens.numel(), dtype=torch.float64)
    for b in range(B):
        for g in range(p.num_groups):
            members = (p.groups == g).nonzero().flatten()
            for t, j in enumerate(p.tokens.tolist()):
                if len(members):
                    pooled[b, :, g, t] = probs[b, :, members, j].mean(dim=-1)
    return probs @ p.v, pooled if p.keep_heads else pooled.mean(dim=1)


@pytest.mark.parametrize("keep_heads", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_naive_backend_matches_definition(keep_heads, masked):
    p = make_problem(B=2, H=3, N=29, M=13, D=8, T=4, G=6, masked=masked, keep_heads=keep_heads, seed=5)
    out, pooled = attention_pool(
        p.q,
        p.k,
        p.v,
        p.groups,
        p.tokens,
        key_padding_mask=p.mask,
        keep_heads=keep_heads,
        num_groups=6,
        backend="naive",
    )
    ref_out, ref_pooled = _loop_reference(p)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-12, atol=1e-12)


def test_out_equals_scaled_dot_product_attention():
    p = make_problem(B=2, H=4, N=300, M=77, D=64, T=3, G=10, masked=False, keep_heads=False, seed=7)
    q, k, v = (t.float() for t in (p.q, p.k, p.v))
    out, _ = attention_pool(q, k, v, p.groups, p.tokens, backend="torch", scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=0, atol=ulps(expected))


@pytest.mark.parametrize("masked, keep_heads", [(False, False), (True, True), (True, False)])
def test_torch_backend_gradcheck(masked, keep_heads):
    p = make_problem(B=2, H=2, N=11, M=6, D=4, T=3, G=4, masked=masked, keep_heads=keep_heads, seed=11)
    inputs = tuple(t.clone().requires_grad_() for t in (p.q, p.k, p.v))

    def fn(q, k, v):
        return attention_pool(
            q,
            k,
            v,
            p.groups,
            p.tokens,
            key_padding_mask=p.mask,
            keep_heads=keep_heads,
            num_groups=4,
            backend="torch",
        )

    assert torch.autograd.gradcheck(fn, inputs)


@settings(max_examples=20)
@given(problems(max_n=60))
def test_portable_sdpa_path_matches_naive(problem):
    """The path the torch backend takes off CPU, exercised here by calling it directly."""
    p = problem
    spec = make_pool_spec(p.groups, p.tokens, p.num_groups, p.q.shape[1], p.keep_heads)
    bias = None if p.mask is None else torch.zeros(p.mask.shape, dtype=torch.float64).masked_fill(p.mask, -torch.inf)
    bias = None if bias is None else bias[:, None, None, :]
    q, k, v = (t.clone().requires_grad_() for t in (p.q, p.k, p.v))
    scale = p.q.shape[-1] ** -0.5
    got = attention_pool_sdpa(q, k, v, spec, scale, bias)
    want = attention_pool(
        q,
        k,
        v,
        p.groups,
        p.tokens,
        key_padding_mask=p.mask,
        keep_heads=p.keep_heads,
        num_groups=p.num_groups,
        backend="naive",
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    grads = [torch.autograd.grad(sum(t.sum() * (i + 1) for i, t in enumerate(r)), (q, k, v)) for r in (got, want)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("use_out, use_pooled", [(True, False), (False, True)])
def test_gradient_from_one_output_only(use_out, use_pooled):
    p = make_problem(B=1, H=2, N=40, M=20, D=16, T=2, G=3, masked=False, keep_heads=False, seed=13)
    grads = {}
    for backend in ("naive", "torch"):
        q, k, v = (t.clone().requires_grad_() for t in (p.q, p.k, p.v))
        out, pooled = attention_pool(q, k, v, p.groups, p.tokens, backend=backend)
        loss = (out.square().sum() if use_out else 0) + (pooled.sum() * 3 if use_pooled else 0)
        grads[backend] = torch.autograd.grad(loss, (q, k, v), allow_unused=True, materialize_grads=True)
    for a, b in zip(grads["torch"], grads["naive"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads["torch"][2].abs().max() > 0 if use_out else torch.equal(grads["torch"][2], torch.zeros_like(v))


def test_repeated_tokens_and_empty_tiles():
    p = make_problem(B=1, H=2, N=10, M=9, D=8, T=3, G=2, masked=False, keep_heads=False, seed=17)
    tokens = torch.tensor([4, 4, 1])
    groups = torch.zeros(10, dtype=torch.long)  # tiles 1 and 2 are empty
    _, pooled = attention_pool(p.q, p.k, p.v, groups, tokens, num_groups=3, backend="torch")
    torch.testing.assert_close(pooled[:, 0, 0], pooled[:, 0, 1])
    assert torch.equal(pooled[:, 1:], torch.zeros_like(pooled[:, 1:]))


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_key_bias_weighs_a_key_as_its_copies(backend):
    assert_key_bias_counts_copies(backend, torch.float64, 1e-10)
    assert_key_bias_counts_copies(backend, torch.float32, 1e-5)


def test_auto_backend_on_cpu_is_torch():
    assert resolve_backend("auto", torch.zeros(1, 1, 1, 8)).name == "torch"
    assert resolve_backend("naive", torch.zeros(1, 1, 1, 8)).name == "naive"  # named: runs though not automatic


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.zeros(1, 1, 1, 8))


def _inputs(B=2, H=2, N=8, M=5, D=4):
    return torch.randn(B, H, N, D), torch.randn(B, H, M, D), torch.randn(B, H, M, D), torch.zeros(N, dtype=torch.long)


def _bad_calls():
    q, k, v, g = _inputs()
    mask_all = torch.zeros(2, 5, dtype=torch.bool)
    mask_all[1] = True
    bias = mask_all.float()  # [2, 5], zero in batch item 0
    return {
        "4-D tensor": lambda: attention_pool(q[0], k, v, g, [0]),
        "dtypes differ": lambda: attention_pool(q, k.double(), v, g, [0]),
        "floating point": lambda: attention_pool(q.long(), k, v, g, [0]),
        "to match q": lambda: attention_pool(q, k[:, :1], v, g, [0]),
        "one per query": lambda: attention_pool(q, k, v, g[:3], [0]),
        "tokens is empty": lambda: attention_pool(q, k, v, g, []),
        "tokens must index keys": lambda: attention_pool(q, k, v, g, [5]),
        "negative tile": lambda: attention_pool(q, k, v, g - 1, [0]),
        "num_groups is 1": lambda: attention_pool(q, k, v, g + 1, [0], num_groups=1),
        "1-D integer": lambda: attention_pool(q, k, v, g.float(), [0]),
        "bool tensor of shape": lambda: attention_pool(q, k, v, g, [0], key_padding_mask=mask_all[:, :2]),
        "every key of batch item 1": lambda: attention_pool(q, k, v, g, [0], key_padding_mask=mask_all),
        "unknown backend": lambda: attention_pool(q, k, v, g, [0], backend="cuda"),
        "scale must be finite": lambda: attention_pool(q, k, v, g, [0], scale=float("nan")),
        "empty input": lambda: attention_pool(q[:, :, :0], k, v, g[:0], [0]),
        "key_bias must be a float tensor of shape": lambda: attention_pool(q, k, v, g, [0], key_bias=bias[0]),
        "key_bias has non-finite": lambda: attention_pool(q, k, v, g, [0], key_bias=bias.log()),
    }


@pytest.mark.parametrize("message", list(_bad_calls()))
def test_bad_input_gets_one_line_error(message):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        _bad_calls()[message]()
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("attention_pool: ")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs_as_attention_processors_pass_them(backend):
    """diffusers hands over q, k, v as transposed views of [B, L, H, D] projections."""
    p = make_problem(B=2, H=3, N=50, M=20, D=16, T=4, G=5, masked=True, keep_heads=False, seed=19)
    views = [t.float().transpose(1, 2).contiguous().transpose(1, 2) for t in (p.q, p.k, p.v)]
    assert not views[0].is_contiguous()
    got = attention_pool(*views, p.groups, p.tokens, key_padding_mask=p.mask, backend=backend)
    want = attention_pool(*(t.float() for t in (p.q, p.k, p.v)), p.groups, p.tokens, key_padding_mask=p.mask)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=ulps(b))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    st.sampled_from([torch.float16, torch.bfloat16]),
    st.floats(1.0, 1e4),
    st.floats(0.0, 60.0),
    st.integers(0, 2**31 - 1),
)
def test_torch_backend_half_precision_at_large_logits_and_biases(dtype, logit, bias_size, seed):
    """Scores up to ±1e4 and key biases up to ±60: the pooled maps (probabilities) stay within the dtype's own
    rounding (eps) of float64 on the same rounded inputs; forming the scores in half precision missed by up
    to 756 (bf16) and 0.04 (fp16)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen, dtype=torch.float64) for n in (48, 24, 24))
    q = q * (logit / 32**0.5 / 4)  # |scores| about `logit`
    bias = (torch.rand(1, 24, generator=gen, dtype=torch.float64) * 2 - 1) * bias_size
    groups, tokens = torch.arange(48) % 5, torch.tensor([0, 5, 5, 23])
    q, k, v, bias = (t.to(dtype) for t in (q, k, v, bias))
    _, pooled = attention_pool(q, k, v, groups, tokens, key_bias=bias, backend="torch")
    _, expected = attention_pool(
        *(t.double() for t in (q, k, v)), groups, tokens, key_bias=bias.double(), backend="naive"
    )
    assert pooled.dtype == dtype and torch.isfinite(pooled).all()
    assert (pooled.double() - expected).abs().max() <= torch.finfo(dtype).eps


@pytest.mark.parametrize(
    "zero_rows, map_gradient, augmented",
    [("none", True, False), ("none", False, False), ("some", True, True), ("all", True, True), ("all", False, False)],
)
def test_cpu_backward_paths_match_float64_naive(monkeypatch, zero_rows, map_gradient, augmented):
    """The maps' gradient is folded into the fused backward wherever every row has an output gradient; a
    row without one (its output unread) sends the call to the augmented fallback. Both match the reference."""
    import cvg.ops.attention_pool_torch as module

    calls = []
    augment = module.augment_keys_values
    monkeypatch.setattr(module, "augment_keys_values", lambda *a: calls.append(1) or augment(*a))
    p = make_problem(B=2, H=3, N=90, M=33, D=16, T=4, G=7, masked=True, keep_heads=False, seed=29)
    gen = torch.Generator().manual_seed(3)
    dout = torch.randn(p.q.shape, generator=gen, dtype=torch.float64)
    if zero_rows == "some":
        dout[:, :, ::3] = 0
    elif zero_rows == "all":
        dout.zero_()
    dpooled = torch.randn(2, 7, 4, generator=gen, dtype=torch.float64) * map_gradient
    grads = {}
    for backend, dtype in (("naive", torch.float64), ("torch", torch.float32)):
        q, k, v = (t.to(dtype).requires_grad_() for t in (p.q, p.k, p.v))
        outputs = attention_pool(q, k, v, p.groups, p.tokens, key_padding_mask=p.mask, num_groups=7, backend=backend)
        grads[backend] = torch.autograd.grad(outputs, (q, k, v), (dout.to(dtype), dpooled.to(dtype)))
    for got, want in zip(grads["torch"], grads["naive"], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=ulps(want.float(), 128))
    assert bool(calls) == augmented
