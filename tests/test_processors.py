"""Recording processors on a tiny Wan transformer."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from cvg.processors import PoolingWanAttnProcessor, record_maps, resolve_layers


def _forward(transformer, seed=0, frames=3, size=8, text=20):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, size, size, generator=gen)
    text_embeds = torch.randn(1, text, 384, generator=gen)
    with torch.no_grad():
        return transformer(latents, torch.tensor([500]), text_embeds, return_dict=False)[0]


def test_no_tokens_is_identical_to_diffusers(tiny_pipe):
    transformer = tiny_pipe.transformer
    reference = _forward(transformer)
    with record_maps(transformer, []) as recorder:
        assert isinstance(transformer.blocks[0].attn2.processor, PoolingWanAttnProcessor)
        out = _forward(transformer)
    assert torch.equal(out, reference) and recorder.maps == {}


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_recording_keeps_the_output_and_records_maps(tiny_pipe, backend):
    transformer = tiny_pipe.transformer
    reference = _forward(transformer)
    with record_maps(transformer, [1, 4, 4], pool=(1, 2, 2), backend=backend) as recorder:
        out = _forward(transformer)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert recorder.grid == (3, 4, 4) and recorder.tiles == (3, 2, 2)
    assert sorted(recorder.maps) == [0, 1]
    assert recorder.stacked().shape == (1, 2, 3, 2, 2, 3)


def test_maps_of_all_keys_sum_to_one(tiny_pipe):
    """Each query's attention over all text tokens sums to 1, so tile means over all tokens do too."""
    with record_maps(tiny_pipe.transformer, list(range(20)), pool=(2, 3, 3), keep_heads=True) as recorder:
        _forward(tiny_pipe.transformer, frames=3, size=12)
    for maps in recorder.maps.values():
        assert maps.shape == (1, 2, 2 * 2 * 2, 20)  # [B, H, tiles (2, 2, 2), T]
        torch.testing.assert_close(maps.sum(-1), torch.ones(1, 2, 8))


def test_processors_are_restored_even_after_an_error(tiny_pipe):
    transformer = tiny_pipe.transformer
    before = [block.attn2.processor for block in transformer.blocks]
    with pytest.raises(RuntimeError, match="boom"), record_maps(transformer, [1], layers=[-1]):
        assert isinstance(transformer.blocks[1].attn2.processor, PoolingWanAttnProcessor)
        assert isinstance(transformer.blocks[0].attn2.processor, WanAttnProcessor)
        raise RuntimeError("boom")
    assert [block.attn2.processor for block in transformer.blocks] == before
    assert not transformer._forward_pre_hooks


def test_layer_and_model_errors(tiny_pipe):
    with pytest.raises(ValueError, match="2 blocks"):
        resolve_layers(tiny_pipe.transformer, [5])
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        resolve_layers(torch.nn.Linear(2, 2), None)
