"""bfloat16 runs as accurately as diffusers' own bfloat16 (the flash-attention rule): each cvg path's
error against a float64 reference is at most twice the error of the stock bf16 computation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import make_problem

from cvg import attention_pool
from cvg.models.wan import cast_transformer, load_wan_pipeline
from cvg.ops.attention_pool_torch import attention_pool_sdpa
from cvg.ops.pooling import make_pool_spec
from cvg.runtime.step_backend import StepBackend, StepShape

RULE = 2.0  # allowed error relative to the stock bf16 computation's, as flash-attention tests
HALF_TYPES = (torch.bfloat16, torch.float16)  # float16 runs on CPU too (torch's reference kernels)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs().max())


@pytest.fixture(scope="module")
def transformers(tiny_model_dir):
    """The tiny transformer in float64 (reference) and as diffusers loads it in bf16 and in float16 (norms,
    time embedding and modulation kept in float32)."""
    float32 = load_wan_pipeline(tiny_model_dir).transformer
    low = {dtype: load_wan_pipeline(tiny_model_dir, transformer_dtype=dtype).transformer for dtype in HALF_TYPES}
    assert all(low[dtype].dtype == dtype for dtype in HALF_TYPES)
    return copy.deepcopy(float32).double(), low


def _inputs(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, transformer.config.in_channels, 3, 8, 8, generator=gen)
    text = torch.randn(1, 64, transformer.config.text_dim, generator=gen)
    text[:, 20:] = 0  # Wan's zero padding, which the engines collapse
    return latents, torch.tensor([700.0]), text


@torch.no_grad()
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_step_engine_in_half_precision_is_as_accurate_as_diffusers(transformers, dtype):
    reference, low = transformers
    latents, t, text = _inputs(reference)
    want = reference(latents.double(), t, text.double(), return_dict=False)[0]
    stock = low[dtype](latents.to(dtype), t, text.to(dtype), return_dict=False)[0]
    text16 = text.to(dtype)
    engine = StepBackend(low[dtype], StepShape.of(latents.to(dtype), text16))
    got = engine(latents.to(dtype), t, text16)
    assert got.dtype == dtype
    assert _err(got, want) <= RULE * _err(stock, want), (_err(got, want), _err(stock, want))


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("keep_heads", [False, True])
def test_attention_pool_half_is_as_accurate_as_sdpa_half(keep_heads, dtype):
    """out, dq, dk, dv against SDPA in the same half type; pooled against the maps of a softmax in it (what a stock
    processor that reads attention probabilities gets), all measured on float64."""
    p = make_problem(B=2, H=4, N=512, M=77, D=64, T=6, G=16, masked=False, keep_heads=keep_heads, seed=7)
    p.q, p.k = p.q * 3, p.k * 3  # large logits: where half-precision softmax statistics go wrong
    grad_out = torch.randn(p.q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(dtype, pool):
        q, k, v = (x.detach().to(dtype).clone().requires_grad_() for x in (p.q, p.k, p.v))
        if pool:
            out, pooled = attention_pool(
                q, k, v, p.groups, p.tokens, num_groups=p.num_groups, keep_heads=keep_heads, backend="torch"
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v)
            probs = torch.softmax((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5, dim=-1)[..., p.tokens]
            weights = torch.zeros(p.num_groups, q.shape[2], dtype=torch.float64)
            weights[p.groups, torch.arange(q.shape[2])] = 1.0
            weights /= weights.sum(1, keepdim=True).clamp_min(1)
            pooled = torch.einsum("gn,bhnt->bhgt", weights.to(dtype), probs.detach())
            pooled = pooled if keep_heads else pooled.mean(1)
        out.backward(grad_out.to(dtype))
        return out, pooled, q.grad, k.grad, v.grad

    want = run(torch.float64, pool=False)
    stock = run(dtype, pool=False)
    got = run(dtype, pool=True)
    for name, g, s, w in zip(("out", "pooled", "dq", "dk", "dv"), got, stock, want, strict=True):
        assert _err(g, w) <= RULE * _err(s, w), (name, _err(g, w), _err(s, w))


def test_cast_transformer_matches_diffusers_bf16_load(tiny_model_dir):
    """The benchmark's cast of a built model is what `from_pretrained(dtype=)` loads: same dtypes, same values."""
    loaded = load_wan_pipeline(tiny_model_dir, transformer_dtype=torch.bfloat16).transformer.state_dict()
    cast = cast_transformer(load_wan_pipeline(tiny_model_dir).transformer, torch.bfloat16).state_dict()
    assert {k: v.dtype for k, v in cast.items()} == {k: v.dtype for k, v in loaded.items()}
    assert {v.dtype for v in cast.values()} == {torch.float32, torch.bfloat16}  # some modules are kept in float32
    assert all(torch.equal(cast[k], loaded[k]) for k in loaded)


def test_transformer_dtype_and_diffusers_dtype_together_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="not both"):
        load_wan_pipeline(tiny_model_dir, transformer_dtype=torch.bfloat16, dtype=torch.float32)


@pytest.mark.parametrize("dout_rows", ["all", "half"])
def test_attention_pool_bf16_map_gradients_are_as_accurate_as_augmented_sdpa_bf16(dout_rows):
    """Gradients through both outputs against autograd through one augmented SDPA call in bf16 (values with
    one-hot columns: what reading the maps costs with stock attention). With an output gradient in every
    row the maps' share is folded into the fused backward; with half the rows lacking one, the fallback on
    augmented tensors runs."""
    p = make_problem(B=2, H=4, N=512, M=77, D=64, T=6, G=16, masked=True, keep_heads=False, seed=9)
    p.q, p.k = p.q * 3, p.k * 3
    spec = make_pool_spec(p.groups, p.tokens, p.num_groups, 4, False)
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(p.q.shape, generator=gen, dtype=torch.float64)
    if dout_rows == "half":
        grad_out[:, :, ::2] = 0
    grad_pooled = torch.randn(2, p.num_groups, 6, generator=gen, dtype=torch.float64) * 50

    def run(dtype, pool):
        q, k, v = (x.detach().to(dtype).clone().requires_grad_() for x in (p.q, p.k, p.v))
        if pool:
            outputs = attention_pool(
                q, k, v, p.groups, p.tokens, key_padding_mask=p.mask, num_groups=p.num_groups, backend="torch"
            )
        else:
            bias = torch.zeros(p.mask.shape, dtype=dtype).masked_fill(p.mask, -torch.inf)[:, None, None]
            outputs = attention_pool_sdpa(q, k, v, spec, 64**-0.5, bias)
        torch.autograd.backward(outputs, (grad_out.to(dtype), grad_pooled.to(dtype)))
        return *outputs, q.grad, k.grad, v.grad

    want = run(torch.float64, pool=False)
    stock = run(torch.bfloat16, pool=False)
    got = run(torch.bfloat16, pool=True)
    for name, g, s, w in zip(("out", "pooled", "dq", "dk", "dv"), got, stock, want, strict=True):
        assert _err(g, w) <= RULE * _err(s, w), (name, _err(g, w), _err(s, w))


def test_vae_dtype_is_chosen_apart(tiny_model_dir):
    pipe = load_wan_pipeline(tiny_model_dir, vae_dtype=torch.bfloat16)
    assert pipe.vae.dtype == torch.bfloat16 and pipe.transformer.dtype == torch.float32
    assert load_wan_pipeline(tiny_model_dir, transformer_dtype=torch.bfloat16).vae.dtype == torch.float32


def test_bf16_vae_decode_is_as_accurate_as_diffusers_bf16_decode(tiny_model_dir):
    """A bf16 VAE through cvg's CPU decode paths against the float64 decode, beside diffusers' own bf16
    decode; `decode_latents` hands back float32 video either way."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from cvg.models.vae_cpu import cpu_decoding
    from cvg.models.wan import decode_latents

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True]
    )
    for m in vae.modules():
        if isinstance(m, WanRMS_norm):
            torch.nn.init.uniform_(m.gamma, 0.5, 1.5)
    latents = torch.randn(1, 16, 3, 16, 16)
    with torch.no_grad():
        want = copy.deepcopy(vae).double().decode(latents.double()).sample
        bf16 = vae.to(torch.bfloat16).eval()
        stock = bf16.decode(latents.to(torch.bfloat16)).sample
        with cpu_decoding(bf16):
            got = bf16.decode(latents.to(torch.bfloat16)).sample
    assert 0 < _err(got, want) <= RULE * _err(stock, want), (_err(got, want), _err(stock, want))
    pipe = load_wan_pipeline(tiny_model_dir, vae_dtype=torch.bfloat16)
    video = decode_latents(pipe, torch.randn(1, pipe.vae.config.z_dim, 2, 8, 8), "pt")
    assert video.dtype == torch.float32 and torch.isfinite(video).all()
