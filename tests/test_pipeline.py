"""CVGPipeline on tiny Wan pipelines: exact reproduction without guidance, guidance that works, bad input."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from guided import OBJECTIVES, PROMPTS, classifier_objective, objective_after_guided_steps
from guided import seeded as _seeded
from tolerance import ulps

from cvg.guidance import activations
from cvg.guidance.composition import CompositionError
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import MotionDirection, SpatialRelation
from cvg.models.caching import WAN_TAYLORSEER_MODULES
from cvg.models.wan import cast_transformer
from cvg.pipeline import CVGPipeline
from cvg.request import PipelineOptions

SMALL = dict(height=64, width=64, num_frames=9, num_inference_steps=6, max_sequence_length=64)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
@pytest.mark.parametrize("scheduler", ["flow-euler", "unipc"])
def test_without_guidance_it_is_wan_pipeline(tiny_pipe, guidance_scale, scheduler):
    pipe = tiny_pipe
    if scheduler == "unipc":
        unipc = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
        pipe = WanPipeline(**{**tiny_pipe.components, "scheduler": unipc})
        pipe.set_progress_bar_config(disable=True)
    prompts = ["a red cube to the left of a blue ball", "a green ball moves up"]
    kw = dict(SMALL, guidance_scale=guidance_scale, num_videos_per_prompt=2, output_type="np")
    reference = pipe(prompts, generator=_seeded(3), **kw).frames
    for composition in (None, "red cube and ball"):
        out = CVGPipeline(pipe)(prompts, composition, guide_steps=0, generator=_seeded(3), **kw)
        assert out.frames.shape == reference.shape == (4, 9, 64, 64, 3)
        assert np.abs(out.frames - reference).max() <= 1e-5
        assert out.steps == []


def test_prompts_are_encoded_over_their_own_tokens(tiny_pipe):
    """CVGPipeline.encode_prompt runs the text encoder over each batch's longest prompt, not over 512 tokens:
    the same embeddings as WanPipeline's (zero rows where Wan zeroes them), to float rounding."""
    pipe, calls = CVGPipeline(tiny_pipe), []
    kw = dict(
        prompt=["a red cube to the left of a blue ball", "a green ball"],
        negative_prompt=["blurry", "a cube moving left"],
        do_classifier_free_guidance=True,
        num_videos_per_prompt=2,
        max_sequence_length=64,
    )
    with tiny_pipe.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1])):
        reference = tiny_pipe.encode_prompt(**kw)
        encoded = pipe.encode_prompt(**kw)
    assert calls[:2] == [64, 64] and max(calls[2:]) < 16  # diffusers' two calls at full length, then cvg's
    for got, expected in zip(encoded, reference, strict=True):
        assert got.shape == expected.shape == (4, 64, tiny_pipe.text_encoder.config.hidden_size)
        assert torch.equal(got.eq(0).all(-1), expected.eq(0).all(-1))
        torch.testing.assert_close(got, expected, rtol=0, atol=ulps(expected))


def test_encoded_prompts_are_kept_until_the_encoder_changes():
    from cvg.models.tiny import tiny_wan_pipeline

    wan = tiny_wan_pipeline(seed=0)  # its own: this test changes the encoder's weights
    pipe, calls = CVGPipeline(wan), []
    wan.text_encoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    kw = dict(prompt="a red cube", do_classifier_free_guidance=True, max_sequence_length=64)
    first = pipe.encode_prompt(**kw)
    again = pipe.encode_prompt(**kw)
    assert len(calls) == 2 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    again[0].zero_()  # a caller's copy: the kept encoding is not changed through it
    assert torch.equal(pipe.encode_prompt(**kw)[0], first[0]) and len(calls) == 2
    with torch.no_grad():
        wan.text_encoder.embeddings.word_embeddings.weight.mul_(2)
    changed = pipe.encode_prompt(**kw)
    assert len(calls) == 4 and not torch.equal(changed[0], first[0])


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_guidance_lowers_the_objective(tiny_pipe, name):
    kind, objective = OBJECTIVES[name]
    for seed in range(5):
        guided = objective_after_guided_steps(tiny_pipe, kind, objective, seed, 2, SMALL)
        unguided = objective_after_guided_steps(tiny_pipe, kind, objective, seed, 0, SMALL)
        assert guided < unguided, f"{name}, seed {seed}: guided {guided:.5f} >= unguided {unguided:.5f}"


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_guided_batch_records_every_item(tiny_pipe, guidance_scale):
    prompts = ["a red cube to the left of a blue ball", "a red cube sits left of a blue ball"]
    cvg = CVGPipeline(tiny_pipe, guidance=GuidanceConfig(guide_steps=2, iterations=2, pool=(1, 1, 1)))
    out = cvg(
        prompts,
        "red cube left of blue ball",
        guidance_scale=guidance_scale,
        generator=_seeded(0),
        num_videos_per_prompt=2,
        output_type="np",
        **SMALL,
    )
    assert out.frames.shape == (4, 9, 64, 64, 3)
    assert [(s.step, s.iteration) for s in out.steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(v.shape == (4,) for v in out.objective_values)
    heads = tiny_pipe.transformer.config.num_attention_heads
    assert out.maps[0].shape == (4, 2, heads, 3, 4, 4, 5)  # the prompts place "blue ball" differently: 5 tokens


class _PoisonFirstItem:
    """An objective whose gradient is NaN for batch item 0."""

    def __call__(self, maps, bound, timestep=None):
        loss = SpatialRelation()(maps, bound, timestep)
        return loss * torch.tensor([float("nan"), 1.0])


def test_non_finite_gradient_skips_the_update_with_a_warning(tiny_pipe):
    prompts = ["a red cube to the left of a blue ball"] * 2
    config = GuidanceConfig(guide_steps=1, strength=0.5, pool=(1, 1, 1))
    captured = {}
    cvg = CVGPipeline(tiny_pipe, objective=_PoisonFirstItem(), guidance=config)
    with pytest.warns(RuntimeWarning, match=r"non-finite guidance gradient for batch items \[0\]"):
        out = cvg(
            prompts,
            "red cube left of blue ball",
            generator=_seeded(0),
            output_type="latent",
            on_step=lambda i, t, x: captured.setdefault(i, x.clone()),
            **SMALL,
        )
    assert out.steps[0].skipped.tolist() == [True, False]
    assert torch.isfinite(out.frames).all()
    plain = CVGPipeline(tiny_pipe)(prompts, None, generator=_seeded(0), output_type="latent", **SMALL).frames
    assert torch.equal(out.frames[0], plain[0]) and not torch.equal(out.frames[1], plain[1])


def test_bad_input(tiny_pipe, tmp_path):
    cvg = CVGPipeline(tiny_pipe)
    with pytest.raises(ValueError, match="guide_steps must be between 0 and num_inference_steps"):
        cvg("a red cube", "red cube", guide_steps=7, **SMALL)
    with pytest.raises(CompositionError, match="'green ball' is not in the prompt"):
        cvg("a red cube", "red cube left of green ball", **SMALL)
    with pytest.raises(TypeError, match="expected a diffusers WanPipeline or CogVideoXPipeline, got object"):
        CVGPipeline(object())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CVGPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a diffusers pipeline directory"):
        CVGPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "LTXPipeline"}')
    with pytest.raises(ValueError, match="holds a LTXPipeline; cvg guides WanPipeline, CogVideoXPipeline pipelines"):
        CVGPipeline.from_pretrained(tmp_path)


def test_from_pretrained_loads_a_saved_pipeline(tiny_pipe, tiny_model_dir):
    loaded = CVGPipeline.from_pretrained(tiny_model_dir)
    loaded.pipe.set_progress_bar_config(disable=True)
    kw = dict(SMALL, output_type="np")
    a = loaded("a red cube to the left of a blue ball", None, generator=_seeded(1), **kw).frames
    b = CVGPipeline(tiny_pipe)("a red cube to the left of a blue ball", None, generator=_seeded(1), **kw).frames
    assert np.abs(a - b).max() <= 1e-5


def test_checkpointing_changes_memory_not_results(tiny_pipe):
    """Guided latents agree with and without gradient checkpointing; the model's own settings come back."""
    transformer = tiny_pipe.transformer
    flags = [p.requires_grad for p in transformer.parameters()]
    results = []
    for checkpointing in (True, False):
        config = GuidanceConfig(guide_steps=2, iterations=2, pool=(1, 1, 1), checkpointing=checkpointing)
        out = CVGPipeline(tiny_pipe, guidance=config)(
            *PROMPTS["spatial"], generator=_seeded(4), output_type="latent", **SMALL
        )
        results.append(out.frames)
        assert not transformer.gradient_checkpointing
        assert [p.requires_grad for p in transformer.parameters()] == flags
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(
        results[0],
        CVGPipeline(tiny_pipe)(PROMPTS["spatial"][0], None, generator=_seeded(4), output_type="latent", **SMALL).frames,
    )


@pytest.mark.parametrize("budget, checkpoints", [(None, False), (0, True)])
def test_checkpointing_by_default_only_past_the_activation_budget(tiny_pipe, monkeypatch, budget, checkpoints):
    """checkpointing=None: the tiny model's guided steps run without recomputation, and with it once its
    activations pass the budget."""
    if budget is not None:
        monkeypatch.setattr(activations, "ACTIVATION_BUDGET_BYTES", budget)
    calls = []
    monkeypatch.setattr(activations, "checkpoint_block", lambda block, *args: calls.append(block) or block(*args))
    config = GuidanceConfig(guide_steps=1, pool=(1, 1, 1))
    CVGPipeline(tiny_pipe, guidance=config)(*PROMPTS["spatial"], generator=_seeded(4), output_type="latent", **SMALL)
    assert bool(calls) == checkpoints


LATENTS = torch.randn(1, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # 768 video tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activation_estimate_bounds_what_blocks_save(dtype):
    """The checkpointing rule's estimate is at least what Wan blocks save for the latent's gradient (weights
    frozen; measured with saved-tensor hooks as blocks 2-3 of a 3-block model over a 1-block one), and
    within 3x of it."""

    def saved(num_layers: int) -> tuple[int, WanTransformer3DModel]:
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
            text_dim=384, freq_dim=256, ffn_dim=256, num_layers=num_layers, rope_max_seq_len=32,
        )  # fmt: skip
        cast_transformer(model.requires_grad_(False), dtype)
        storages = {}

        def keep(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model(
                hidden_states=LATENTS.to(dtype).requires_grad_(),
                timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 16, 384, dtype=dtype),
                return_dict=False,
            )
        return sum(storages.values()), model

    (one, _), (three, model) = saved(1), saved(3)
    estimate = activations.saved_activation_bytes(model, LATENTS, blocks=2)
    assert three - one <= estimate <= 3 * (three - one)


@pytest.mark.parametrize("base_dim, dim_mult", [(3, [1, 1, 1, 1]), (8, [1, 2, 2])])
def test_cpu_decoding_is_the_vae_decode(base_dim, dim_mult):
    """The fast CPU paths give diffusers' decode (to float rounding) and leave the VAE as it was."""
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

    from cvg.models.vae_cpu import cpu_decoding

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=16,
        dim_mult=dim_mult,
        num_res_blocks=1,
        temperal_downsample=[False, True, True][: len(dim_mult) - 1],
    ).eval()
    for m in vae.modules():  # non-trivial norm scales, so the norm's arithmetic is checked
        if isinstance(m, WanRMS_norm):
            torch.nn.init.uniform_(m.gamma, 0.5, 1.5)
    latents = torch.randn(1, 16, 3, 16, 16)
    with torch.no_grad():
        reference = vae.decode(latents).sample
        with cpu_decoding(vae):
            patched = [m for m in vae.modules() if {"_conv_forward", "forward"} & set(vars(m))]
            fast = vae.decode(latents).sample
    assert {type(m) for m in patched} == {WanCausalConv3d, WanRMS_norm}
    assert not [m for m in vae.modules() if {"_conv_forward", "forward"} & set(vars(m))]
    assert fast.shape == reference.shape and (fast - reference).abs().max() <= 1e-5


class _Satisfied:
    """A training-free objective that declares itself satisfied at any loss below 1e9 (as a classifier does
    at its trained confidence)."""

    target_loss = 1e9

    def __call__(self, maps, bound, timestep=None):
        return SpatialRelation()(maps, bound, timestep)


def test_a_bounded_step_leaves_a_satisfied_objective_alone(tiny_pipe):
    prompt, composition = PROMPTS["spatial"]
    config = GuidanceConfig(guide_steps=2, iterations=4, pool=(1, 1, 1), strength=0.5)
    kw = dict(generator=_seeded(0), output_type="latent", **SMALL)
    bounded = CVGPipeline(tiny_pipe, objective=_Satisfied(), guidance=config)(prompt, composition, **kw)
    assert [(s.step, s.iteration) for s in bounded.steps] == [(0, 0), (1, 0)]  # stopped: nothing to gain
    pipe = CVGPipeline(tiny_pipe, objective=_Satisfied(), guidance=config)
    still = pipe(prompt, composition, guidance_strength=0.0, **{**kw, "generator": _seeded(0)})
    assert torch.equal(bounded.frames, still.frames)
    unbounded = CVGPipeline(tiny_pipe, objective=_Satisfied(), guidance=replace(config, bounded=False))
    free = unbounded(prompt, composition, **{**kw, "generator": _seeded(0)})
    assert len(free.steps) == 8 and not torch.equal(free.frames, still.frames)


def test_the_window_by_noise_level_guides_every_step_above_it(tiny_pipe):
    prompt, composition = PROMPTS["spatial"]
    tiny_pipe.scheduler.set_timesteps(SMALL["num_inference_steps"])
    sigmas = tiny_pipe.scheduler.sigmas[:-1]
    threshold = float(sigmas[2])  # steps 0, 1 and 2 lie at or above it
    config = GuidanceConfig(guide_sigma=threshold, iterations=1, pool=(1, 1, 1))
    out = CVGPipeline(tiny_pipe, guidance=config)(
        prompt, composition, generator=_seeded(0), output_type="latent", **SMALL
    )
    assert [s.step for s in out.steps] == [0, 1, 2]
    by_number = CVGPipeline(tiny_pipe, guidance=config)(
        prompt, composition, guide_steps=1, generator=_seeded(0), output_type="latent", **SMALL
    )
    assert [s.step for s in by_number.steps] == [0]  # an explicit number wins
    with pytest.raises(ValueError, match="guide_sigma must be in"):
        CVGPipeline(tiny_pipe, guidance=GuidanceConfig(guide_sigma=1.5))(prompt, composition, **SMALL)


def test_non_finite_values_never_reach_the_video(tiny_pipe, monkeypatch):
    pipe = CVGPipeline(tiny_pipe)
    latents = torch.randn(1, 16, 3, 8, 8, generator=_seeded(0))
    latents[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latents contain non-finite values"):
        pipe("a red cube", latents=latents, **SMALL)
    forward = tiny_pipe.transformer.forward
    calls = []

    def poisoned(*args, **kwargs):  # the third forward answers NaN, as a broken kernel would
        out = forward(*args, **kwargs)
        calls.append(1)
        return (out[0] * float("nan"),) if len(calls) == 3 else out

    monkeypatch.setattr(tiny_pipe.transformer, "forward", poisoned)
    decoded = []
    monkeypatch.setattr("cvg.models.wan.decode_latents", lambda *a, **k: decoded.append(1))
    with pytest.raises(FloatingPointError, match="non-finite at denoising step 2 .* nothing was decoded"):
        pipe("a red cube", guidance_scale=1.0, generator=_seeded(0), **SMALL)
    assert not decoded


@pytest.mark.parametrize(
    "call, message",
    [
        ({"height": 0}, "height must be a positive multiple of 16, got 0"),
        ({"width": 72}, "width must be a positive multiple of 16, got 72"),
        ({"num_frames": 2}, r"num_frames must be 4k\+1 \(1, 5, 9, ...\), got 2"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be finite"),
        ({"max_sequence_length": 0}, "max_sequence_length must be between 1 and"),
        ({"num_videos_per_prompt": 0}, "num_videos_per_prompt must be at least 1"),
    ],
)
def test_call_arguments_are_checked_by_name(tiny_pipe, call, message):
    with pytest.raises(ValueError, match=message):
        CVGPipeline(tiny_pipe)("a red cube", **{**SMALL, "guide_steps": 0, **call})


def test_candidate_noises_keep_the_best_scored_one(tiny_pipe):
    """With `candidates` K, the K noises are the plain draw and the generator's next K-1 draws; per item the
    one the objective scores lowest at the first timestep is denoised, so its score is the lowest of the K
    and K=1 is the run without selection."""
    prompts = ["a red cube to the left of a blue ball"] * 2
    kw = dict(output_type="latent", guidance_strength=0.0, **SMALL)
    plain = CVGPipeline(tiny_pipe, guidance=GuidanceConfig(guide_steps=1, pool=(1, 1, 1)))
    single = plain(prompts, "red cube left of blue ball", generator=_seeded(0), **kw)
    assert single.candidate_scores is None
    pipe = CVGPipeline(tiny_pipe, guidance=GuidanceConfig(guide_steps=1, pool=(1, 1, 1), candidates=6))
    out = pipe(prompts, "red cube left of blue ball", generator=_seeded(0), **kw)
    scores = out.candidate_scores
    assert scores.shape == (6, 2)
    torch.testing.assert_close(out.steps[0].loss, scores.min(dim=0).values, rtol=0, atol=0)
    torch.testing.assert_close(scores[0], single.steps[0].loss, rtol=0, atol=0)  # candidate 0: the plain draw
    chosen = scores.argmin(dim=0)
    assert chosen.tolist() != [0, 0], "this seed's test needs a candidate other than the first to win"
    for item, best in enumerate(chosen.tolist()):  # the same denoising as a run started from that noise
        noises = torch.randn((6, 2, 16, 3, 8, 8), generator=_seeded(0)).flatten(0, 1)  # as diffusers draws them
        started = plain(prompts, "red cube left of blue ball", latents=noises[2 * best : 2 * best + 2], **kw)
        torch.testing.assert_close(out.frames[item], started.frames[item], rtol=0, atol=0)
    with pytest.raises(ValueError, match="candidates must be between 1 and 64, got 0"):
        CVGPipeline(tiny_pipe, guidance=GuidanceConfig(candidates=0))(prompts, "red cube left of blue ball", **SMALL)


def test_geometric_adds_the_training_free_objective_to_the_classifier(tiny_pipe):
    """`geometric`: for spatial and motion compositions the guided loss is the classifier's plus the
    kind's training-free objective (its target the classifier's); presence compositions keep the classifier's."""
    base = GuidanceConfig(guide_steps=1, pool=(1, 1, 1), geometric=False)
    objective = classifier_objective()
    for kind, extra in (("spatial", SpatialRelation()), ("motion", MotionDirection()), ("presence", None)):
        prompt, composition = PROMPTS[kind]
        kw = dict(generator=_seeded(0), output_type="latent", guidance_strength=0.0, **SMALL)
        alone = CVGPipeline(tiny_pipe, objective=objective, guidance=base)(prompt, composition, **kw)
        both = CVGPipeline(tiny_pipe, objective=objective, guidance=replace(base, geometric=True))
        out = both(prompt, composition, **{**kw, "generator": _seeded(0)})
        expected = alone.steps[0].loss
        if extra is not None:
            expected = expected + extra(alone.maps[0], both.bind(prompt, composition, 64))
        torch.testing.assert_close(out.steps[0].loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("engine", [None, "torch"])
def test_batched_cfg_is_the_two_forwards_in_one(tiny_pipe, engine):
    """A step's conditional and unconditional forwards as one batch of two give the two forwards' result
    (float rounding apart), guided steps included, with one transformer call per unguided step."""
    prompts = ["a red cube to the left of a blue ball", "a red cube to the right of a green ball"]
    kw = dict(SMALL, guidance_scale=5.0, num_videos_per_prompt=2, output_type="latent", guide_steps=2)
    config = GuidanceConfig(strength=0.3, pool=(1, 1, 1))
    runs = {}
    for batched in (False, True):
        pipe = CVGPipeline(
            tiny_pipe, SpatialRelation(), config, PipelineOptions(step_backend=engine, batch_cfg=batched)
        )
        calls: list[int] = []  # the batch of every transformer call (the torch engine's too)

        def count(module, args, kwargs, calls=calls):
            calls.append(kwargs["hidden_states"].shape[0])

        hook = tiny_pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
        try:
            runs[batched] = pipe(prompts, "red cube left of ball", generator=_seeded(3), **kw)
        finally:
            hook.remove()
        assert calls.count(8) == (SMALL["num_inference_steps"] if batched else 0)  # one call of both halves a step
    two, one = runs[False].frames, runs[True].frames
    assert two.shape == one.shape == (4, 16, 3, 8, 8)
    assert (one - two).abs().max().item() <= ulps(two, 1024), (one - two).abs().max().item()
    assert torch.equal(runs[False].objective_values[0], runs[True].objective_values[0])  # the first guided read


SERVED = SMALL["num_inference_steps"] - 2  # the steps a cache serves after 2 guided ones


def _step_caches() -> dict:
    """One config of each of diffusers' step caches that works on Wan, set to skip or predict what it can."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    return {
        "first-block": FirstBlockCacheConfig(threshold=1e9),
        "taylorseer": TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, cache_identifiers=WAN_TAYLORSEER_MODULES
        ),
        "magcache": MagCacheConfig(
            threshold=1e9, retention_ratio=0.0, num_inference_steps=SERVED, mag_ratios=[1.0] * SERVED
        ),
    }


@pytest.mark.parametrize("name", ["first-block", "taylorseer", "magcache"])
def test_a_step_cache_serves_only_the_steps_after_the_guided_ones(tiny_pipe, name):
    """diffusers' FirstBlockCache, TaylorSeer and MagCache on the later steps: the guided steps run as without
    it (same objective values), the later ones change, the cache is on exactly from the first unguided step
    and off after the call, also when the call raises; with a step engine it is refused."""
    prompt, composition = PROMPTS["spatial"]
    kw = dict(SMALL, guidance_scale=5.0, output_type="latent", guide_steps=2)
    config = GuidanceConfig(strength=0.3, pool=(1, 1, 1))
    transformer = tiny_pipe.transformer
    runs, seen = {}, {}
    for cache in (None, _step_caches()[name]):
        pipe = CVGPipeline(tiny_pipe, SpatialRelation(), config, cache=cache)
        on = seen[cache is not None] = []
        runs[cache is not None] = pipe(
            prompt,
            composition,
            generator=_seeded(0),
            on_step=lambda i, t, x, on=on: on.append(transformer.is_cache_enabled),
            **kw,
        )
        assert not transformer.is_cache_enabled
    steps = SMALL["num_inference_steps"]
    assert seen[False] == [False] * steps and seen[True] == [i + 1 >= 2 for i in range(steps)]
    for a, b in zip(runs[False].objective_values, runs[True].objective_values, strict=True):
        assert torch.equal(a, b)  # the guided steps never see the cache
    assert not torch.allclose(runs[False].frames, runs[True].frames)  # the later steps do

    def fail(i, t, x):
        if i == 3:
            raise RuntimeError("stop")

    pipe = CVGPipeline(tiny_pipe, SpatialRelation(), config, cache=_step_caches()[name])
    with pytest.raises(RuntimeError, match="stop"):
        pipe(prompt, composition, generator=_seeded(0), on_step=fail, **kw)
    assert not transformer.is_cache_enabled
    with pytest.raises(ValueError, match="cache runs on eager diffusers forwards"):
        CVGPipeline(tiny_pipe, options=PipelineOptions(step_backend="torch"), cache=_step_caches()[name])


def test_a_step_cache_that_would_do_nothing_or_misread_its_steps_is_refused_before_a_step(tiny_pipe):
    """diffusers' TaylorSeer defaults match no Wan module (it would run uncached, silently); MagCache's ratios
    are per served step, so a config for another count would skip the wrong steps: one-line errors, raised
    before the first step, the transformer left without a cache."""
    from diffusers import MagCacheConfig, TaylorSeerCacheConfig

    prompt, composition = PROMPTS["spatial"]
    kw = dict(SMALL, guidance_scale=5.0, output_type="latent", guide_steps=2)
    steps = []
    refused = [
        (
            TaylorSeerCacheConfig(),
            "TaylorSeerCacheConfig hooks no module of this WanTransformer3DModel.*cache_identifiers",
        ),
        (
            MagCacheConfig(num_inference_steps=6, mag_ratios=[1.0] * 6),
            rf"MagCacheConfig\(num_inference_steps=6\): the cache serves {SERVED} steps here.*"
            rf"num_inference_steps={SERVED}",
        ),
    ]
    for cache, message in refused:
        pipe = CVGPipeline(tiny_pipe, SpatialRelation(), GuidanceConfig(pool=(1, 1, 1)), cache=cache)
        with pytest.raises(ValueError, match=message):
            pipe(prompt, composition, generator=_seeded(0), on_step=lambda i, t, x: steps.append(i), **kw)
        assert steps == [] and not tiny_pipe.transformer.is_cache_enabled


def test_first_block_cache_on_a_single_block_is_a_clear_error():
    from diffusers import FirstBlockCacheConfig

    from cvg.models.caching import cached_after
    from cvg.models.tiny import tiny_wan_pipeline

    transformer = tiny_wan_pipeline(0, 1).transformer
    with pytest.raises(ValueError, match="at least 2 blocks"), cached_after(transformer, FirstBlockCacheConfig(), 0):
        pass
    assert not transformer.is_cache_enabled
