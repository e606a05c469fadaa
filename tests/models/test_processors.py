"""Recording processors on a tiny Wan transformer."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from tolerance import ulps

from cvg.models.padding import collapse_padding, needed_length, padded_length
from cvg.models.processors import (
    KeyBiasWanAttnProcessor,
    PoolingWanAttnProcessor,
    TextBias,
    record_maps,
    resolve_layers,
    text_key_bias,
)


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
    torch.testing.assert_close(out, reference, rtol=0, atol=ulps(reference))
    assert recorder.grid == (3, 4, 4) and recorder.tiles == (3, 2, 2)
    assert sorted(recorder.maps) == [0, 1]
    assert recorder.stacked().shape == (1, 2, 2, 3, 2, 2, 3)  # [B, layers, heads, f, h, w, T]


def test_maps_of_all_keys_sum_to_one(tiny_pipe):
    """Each query's attention over all text tokens sums to 1, so tile means over all tokens do too."""
    with record_maps(tiny_pipe.transformer, list(range(20)), pool=(2, 3, 3)) as recorder:
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


def _padded_text(seed=0, real=(5, 9), total=40):
    """Text embeddings the way WanPipeline pads them: real rows, then zero rows up to `total`."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.zeros(len(real), total, 384)
    for i, n in enumerate(real):
        text[i, :n] = torch.randn(n, 384, generator=gen)
    return text


@pytest.mark.parametrize("length", [None, 16, 40])
def test_collapsed_padding_is_exact(tiny_pipe, length):
    """Attention over the first rows, with the key bias, equals attention over the whole padded text."""
    transformer = tiny_pipe.transformer
    gen = torch.Generator().manual_seed(1)
    latents, t, text = torch.randn(2, 16, 3, 8, 8, generator=gen), torch.tensor([700, 300]), _padded_text()
    state = TextBias()
    processors = [KeyBiasWanAttnProcessor(state) for _ in transformer.blocks]
    with torch.no_grad():
        reference = transformer(latents, t, text, return_dict=False)[0]
        short, state.key_bias = collapse_padding(text, length)
        assert short.shape[1] == (10 if length is None else length)
        with text_key_bias(transformer, processors):
            out = transformer(latents, t, short, return_dict=False)[0]
        without_bias = transformer(latents, t, short, return_dict=False)[0]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert [type(b.attn2.processor) for b in transformer.blocks] == [WanAttnProcessor] * len(transformer.blocks)
    if short.shape[1] < text.shape[1]:  # the bias is what makes it exact
        assert (without_bias - reference).abs().max() > 1e-3


def test_recorded_maps_over_collapsed_padding(tiny_pipe):
    transformer = tiny_pipe.transformer
    gen = torch.Generator().manual_seed(2)
    latents, t, text = torch.randn(2, 16, 3, 8, 8, generator=gen), torch.tensor([500, 500]), _padded_text(3)
    short, bias = collapse_padding(text)
    with torch.no_grad():
        with record_maps(transformer, [0, 4], layers=[0]) as full:
            reference = transformer(latents, t, text, return_dict=False)[0]
        with record_maps(transformer, [0, 4], layers=[0], key_bias=bias) as collapsed:
            out = transformer(latents, t, short, return_dict=False)[0]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(collapsed.stacked(), full.stacked(), rtol=0, atol=ulps(full.stacked()))


def test_collapse_refuses_to_cut_text():
    text = _padded_text(real=(5, 9))
    assert needed_length(text) == 10 and padded_length(text) == 40
    message = "the text has 9 rows before its zero padding; with room for its padding they do not fit in 8 keys"
    with pytest.raises(ValueError, match=message):
        collapse_padding(text, 8)
    with pytest.raises(ValueError, match="the text has 4 rows before its zero padding; .* do not fit in 3 keys"):
        collapse_padding(torch.ones(1, 4, 8), 3)  # no padding at all
    with pytest.raises(ValueError, match="cannot keep 41 rows of a 40-row text"):
        collapse_padding(text, 41)
    short, bias = collapse_padding(torch.ones(1, 4, 8))  # nothing to collapse: all rows, no bias
    assert short.shape == (1, 4, 8) and not bias.any()
