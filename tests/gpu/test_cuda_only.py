"""What only a CUDA GPU runs: the Triton kernels compiled for it (not the interpreter) and the compiled
step engine in reduce-overhead mode (CUDA graphs). Skipped without CUDA, as on cvg's CI; on a GPU,
`benchmarks/gpu_check.py` runs every test marked `cuda` (`pytest -m cuda`)."""

import math

import pytest
import torch
from reference import NAMES, make_problem, run

from cvg.ops.attention_pool_torch import attention_pool_sdpa
from cvg.ops.pooling import make_pool_spec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; cvg's CI has none"),
]

RULE = 2.0  # the flash-attention rule: at most twice the stock computation's error in the same dtype
FLOAT32_TOLERANCE = 1e-4  # the interpreter tests' bound: 3xTF32 products keep float32 accuracy


def _problem(head_dim: int, bias: str):
    """N = 1000 queries (no block multiple), 512 keys (Wan's text length), a third of them masked; with
    `bias == "key bias"` one key's score also carries log 7 (a collapsed padding row's count)."""
    p = make_problem(B=2, H=3, N=1000, M=512, D=head_dim, T=6, G=24, masked=True, keep_heads=False, seed=head_dim)
    p.q, p.k = p.q * 2, p.k * 2  # large logits, where half-precision softmax statistics go wrong
    key_bias = None
    if bias == "key bias":
        key_bias = torch.zeros(p.mask.shape, dtype=torch.float64)
        keep = (~p.mask).float().argmax(1)  # a kept key per item
        key_bias[torch.arange(2), keep] = math.log(7)
    return p, key_bias


def _stock(p, key_bias, dtype) -> dict[str, torch.Tensor]:
    """The same outputs and gradients through one augmented SDPA call in `dtype` on the GPU: what reading
    the maps costs with stock attention."""
    from reference import _output_gradients

    q, k, v = (t.to("cuda", dtype).requires_grad_() for t in (p.q, p.k, p.v))
    spec = make_pool_spec(p.groups.cuda(), p.tokens.cuda(), p.num_groups, q.shape[1], p.keep_heads)
    bias = torch.zeros(p.mask.shape, dtype=torch.float64).masked_fill(p.mask, -torch.inf)
    if key_bias is not None:
        bias = bias + key_bias
    out, pooled = attention_pool_sdpa(q, k, v, spec, q.shape[-1] ** -0.5, bias.to("cuda", dtype)[:, None, None])
    dout, dpooled = _output_gradients(out.shape, pooled.shape)
    grads = torch.autograd.grad((out, pooled), (q, k, v), (dout.to("cuda", dtype), dpooled.to("cuda", dtype)))
    return {n: t.detach().cpu().double() for n, t in zip(NAMES, (out, pooled, *grads), strict=True)}


def _errors(got: dict, want: dict) -> dict[str, float]:
    return {n: float((got[n] - want[n]).abs().max()) for n in NAMES}


@pytest.mark.parametrize("bias", ["mask", "key bias"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_kernels_match_float64_naive(dtype, head_dim, bias):
    """out, pooled, dq, dk, dv of the compiled kernels against float64 naive: float32 within 1e-4 of the
    largest magnitude; half types within twice the stock SDPA computation's error in the same type."""
    p, key_bias = _problem(head_dim, bias)
    want = run(p, "naive", torch.float64, key_bias=key_bias)
    got = _errors(run(p, "triton", dtype, "cuda", key_bias), want)
    if dtype == torch.float32:
        bad = {n: e for n, e in got.items() if not e <= FLOAT32_TOLERANCE * float(want[n].abs().max())}
    else:
        stock = _errors(_stock(p, key_bias, dtype), want)
        bad = {n: (e, stock[n]) for n, e in got.items() if not e <= RULE * stock[n]}
    assert not bad, f"triton {dtype} D={head_dim} {bias}: {bad}"


def test_compiled_engine_in_reduce_overhead_mode_matches_eager(tmp_path):
    from cvg.models.tiny import tiny_wan_pipeline
    from cvg.runtime.backends import build_backend
    from cvg.runtime.step_backend import StepShape

    pipe = tiny_wan_pipeline(seed=0, text_encoder_weights=False).to("cuda")
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.randn(1, 80, 384, generator=gen)
    text[:, 10:] = 0
    engine = build_backend(pipe.transformer, StepShape.of(x.cuda(), text.cuda()), "compiled", tmp_path)
    for seed in (1, 2, 3):  # replays: the graph's static buffers are refilled, not stale
        gen = torch.Generator().manual_seed(seed)
        x, t = torch.randn(1, 16, 3, 8, 8, generator=gen).cuda(), torch.tensor(100.0 * seed + 400, device="cuda")
        with torch.no_grad():
            want = pipe.transformer(x, t.expand(1), text.cuda(), return_dict=False)[0]
        got = engine(x, t, text.cuda())
        assert float((got - want).abs().max()) <= FLOAT32_TOLERANCE * max(float(want.abs().max()), 1.0)
