"""CogVideoX's joint attention recorded through attention_pool: the model's output is unchanged, and the maps
(gradients included) equal the video-query x text-key block of the materialised joint softmax."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed

from cvg.models.joint_attention import record_joint_maps
from cvg.models.patching import swapped

TEXT, FRAMES, SIZE, HEAD_DIM = 12, 3, 8, 16  # latents [1, 3, 4, 8, 8]: a 3 x 4 x 4 token grid
TOKENS = [2, 3, 7]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _transformer(rotary: bool, dtype: torch.dtype) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=24,
        num_layers=2,
        sample_width=SIZE,
        sample_height=SIZE,
        sample_frames=(FRAMES - 1) * 4 + 1,
        max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=rotary,
    )
    return model.to(dtype).eval()


def _inputs(rotary: bool, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    kw = dict(
        hidden_states=torch.randn(1, FRAMES, 4, SIZE, SIZE, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(1, TEXT, 24, generator=g, dtype=dtype),
        timestep=torch.tensor([700]),
        return_dict=False,
    )
    if rotary:  # as CogVideoXPipeline makes them for this grid
        grid = SIZE // 2
        cos, sin = get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (grid, grid)), (grid, grid), FRAMES)
        kw["image_rotary_emb"] = (cos.to(dtype), sin.to(dtype))
    return kw


class _Materialised:
    """CogVideoX's joint attention with the probabilities built: keeps, per block, the head-averaged
    `[B, N, T]` video-query x text-key block of the softmax."""

    def __init__(self, kept: dict, layer: int):
        self.kept, self.layer = kept, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        m = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (p(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :, :m], apply_rotary_emb(q[:, :, m:], image_rotary_emb)], 2)
            k = torch.cat([k[:, :, :m], apply_rotary_emb(k[:, :, m:], image_rotary_emb)], 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        self.kept[self.layer] = probs[:, :, m:, TOKENS]
        out = attn.to_out[0]((probs @ v).transpose(1, 2).flatten(2, 3))
        return out[:, m:], out[:, :m]


def _pooled(maps: torch.Tensor) -> torch.Tensor:
    """`[B, H, N, T]` over the 3 x 4 x 4 grid -> tiles of 1 x 2 x 2 means, `[B, H, 3, 2, 2, T]`."""
    grid = maps.unflatten(2, (FRAMES, 2, 2, 2, 2))  # f, tile_h, h in tile, tile_w, w in tile
    return grid.mean(dim=(4, 6))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rotary", [False, True])
def test_joint_maps_are_the_materialised_softmax_block_gradients_included(rotary, dtype):
    model = _transformer(rotary, dtype)
    plain = _inputs(rotary, dtype)
    with torch.no_grad():
        expected_out = model(**plain)[0]
    results = {}
    for name in ("pooled", "materialised"):
        kw = _inputs(rotary, dtype)
        kw["hidden_states"].requires_grad_(True)
        if name == "pooled":
            with record_joint_maps(model, TOKENS, pool=(1, 2, 2), backend="torch") as recorder:
                out = model(**kw)[0]
            maps = recorder.stacked()
        else:
            kept = {}
            blocks = model.transformer_blocks
            with swapped((b.attn1, "processor", _Materialised(kept, i)) for i, b in enumerate(blocks)):
                out = model(**kw)[0]
            maps = torch.stack([_pooled(kept[i]) for i in sorted(kept)], dim=1)
        weights = torch.randn(maps.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        grad = torch.autograd.grad((maps * weights).sum(), kw["hidden_states"])[0]
        results[name] = (out.detach(), maps.detach(), grad)
    tol = TOLERANCE[dtype]
    (out, maps, grad), (ref_out, ref_maps, ref_grad) = results["pooled"], results["materialised"]
    assert maps.shape == (1, 2, model.config.num_attention_heads, FRAMES, 2, 2, len(TOKENS))
    torch.testing.assert_close(out, expected_out, rtol=0, atol=tol)  # recording changes nothing
    torch.testing.assert_close(ref_out, expected_out, rtol=0, atol=tol)  # the reference is CogVideoX's attention
    torch.testing.assert_close(maps, ref_maps, rtol=0, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=tol * max(1.0, ref_grad.abs().max().item()))
    assert maps.sum(-1).lt(1).all()  # a share of the joint softmax: not renormalised over the text keys


def test_bad_input():
    model = _transformer(False, torch.float32)
    with pytest.raises(ValueError, match="layers must index the transformer's 2 blocks, got \\[5\\]"):
        with record_joint_maps(model, TOKENS, layers=[5]):
            pass
    with pytest.raises(ValueError, match="recorded token 40 is past the text's 12 tokens"):
        with record_joint_maps(model, [40], pool=1, backend="torch"), torch.no_grad():
            model(**_inputs(False, torch.float32))
    with pytest.raises(TypeError, match="expected a CogVideoXTransformer3DModel, got Linear"):
        with record_joint_maps(torch.nn.Linear(2, 2), TOKENS):
            pass
