"""Wan's own text path at tiny width: a UMT5 encoder behind a T5-style sentencepiece tokenizer, prompts
padded to 512 tokens. Words of several pieces bind every piece; maps over the collapsed padding are the
maps over all 512 tokens; prompts are cleaned as diffusers cleans them."""

import functools

import numpy as np
import pytest
import torch
from guided import objective_after_guided_steps

from cvg.guidance.composition import Composition
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import SpatialRelation
from cvg.guidance.sampler import Denoiser
from cvg.models.tiny import tiny_wan_pipeline
from cvg.pipeline import CVGPipeline

SMALL = dict(height=64, width=64, num_frames=9, num_inference_steps=4, max_sequence_length=512)
SIX_STEPS = dict(SMALL, num_inference_steps=6)


@functools.cache
def _umt5_pipe():
    """A tiny WanPipeline on the UMT5 path (shared: tests must not modify it)."""
    return tiny_wan_pipeline(seed=0, text_encoder="umt5")


def _pieces(tokenizer, prompt, bound, prompt_index=0):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
    return [[tokens[int(bound.tokens[c])] for c in cols] for cols in bound.columns[prompt_index]]


def test_a_word_of_several_pieces_binds_every_piece():
    tokenizer = _umt5_pipe().tokenizer
    prompt = "a red cube to the left of a blue zebra"
    bound = Composition.parse("red cube left of blue zebra").bind(tokenizer, [prompt], 512)
    # "cube" is two pieces; "zebra", in no piece of the vocabulary, a lone word mark and five letters
    assert _pieces(tokenizer, prompt, bound) == [["▁red", "▁cu", "be"], ["▁blue", "▁", "z", "e", "b", "r", "a"]]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
    nouns = [[tokens[int(bound.tokens[c])] for c in cols] for cols in bound.nouns[0]]
    assert nouns == [["▁cu", "be"], ["▁", "z", "e", "b", "r", "a"]]  # the word mark goes with the noun
    again = "a blue zebra to the right of a red cube"
    bound = Composition.parse("blue zebra right of red cube").bind(tokenizer, [prompt, again], 512)
    assert _pieces(tokenizer, again, bound, 1) == [["▁blue", "▁", "z", "e", "b", "r", "a"], ["▁red", "▁cu", "be"]]


def test_without_guidance_it_is_wan_pipeline_on_cleaned_512_token_prompts():
    pipe = _umt5_pipe()
    prompts = ["a  red cube &amp; a blue ball", "a green &lt;ball&gt;   moves up"]  # diffusers' prompt_clean
    kw = dict(SMALL, guidance_scale=5.0, output_type="np")
    reference = pipe(prompts, generator=torch.Generator().manual_seed(1), **kw).frames
    out = CVGPipeline(pipe)(prompts, None, generator=torch.Generator().manual_seed(1), **kw).frames
    assert np.abs(out - reference).max() <= 1e-5
    bound = CVGPipeline(pipe).bind(prompts[:1], "red cube and blue ball", 512)  # found in the cleaned prompt
    assert len(bound.columns[0]) == 2


@pytest.mark.parametrize("gradient", [False, True])
def test_maps_over_the_collapsed_padding_are_the_maps_over_512_tokens(gradient):
    pipe = _umt5_pipe()
    prompt, composition = "a red cube to the left of a blue ball", "red cube left of blue ball"
    embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)
    assert embeds.shape[1] == 512 and embeds[0, 20:].eq(0).all()  # Wan's zero padding
    denoiser = Denoiser(pipe.transformer, embeds, None, 1.0)
    bound = CVGPipeline(pipe).bind(prompt, composition, 512)
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(900.0)
    results = {}
    for collapse in (True, False):
        config = GuidanceConfig(pool=(1, 1, 1), collapse_padding=collapse)
        loss, maps, grad = denoiser.score(latents, t, SpatialRelation(), bound, config, gradient=gradient)
        results[collapse] = (loss, maps, grad)
    (loss, maps, grad), (full_loss, full_maps, full_grad) = results[True], results[False]
    assert maps.shape[-1] == bound.tokens.numel() == 5  # ▁red ▁cu be, ▁blue ▁ball
    torch.testing.assert_close(maps, full_maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=1e-5)
    if gradient:
        torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-5 * full_grad.abs().max().item())


def test_guidance_lowers_the_objective_on_the_umt5_path():
    for seed in range(5):
        guided = objective_after_guided_steps(_umt5_pipe(), "spatial", SpatialRelation(), seed, 2, SIX_STEPS)
        unguided = objective_after_guided_steps(_umt5_pipe(), "spatial", SpatialRelation(), seed, 0, SIX_STEPS)
        assert guided < unguided, f"seed {seed}: guided {guided:.5f} >= unguided {unguided:.5f}"
