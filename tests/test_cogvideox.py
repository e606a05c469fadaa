"""CogVideoX end to end at tiny width (CogVideoX-5B's layout: rotary embeddings, T5 text, 3D VAE, its DDIM
and DPM schedulers): without guided steps it is CogVideoXPipeline's own output; guidance through the joint
attention's maps lowers every objective; the family is found from model_index.json, `cvg generate` writes
a video and its maps, and what cvg cannot run on CogVideoX is a one-line error."""

import functools
import json

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from guided import OBJECTIVES, PROMPTS, objective_after_guided_steps, seeded
from PIL import Image

from cvg.cli import main
from cvg.guidance.classifier import ClassifierConfig, CompositionClassifier
from cvg.guidance.config import GuidanceConfig
from cvg.models.cogvideox import CogVideoXSolver
from cvg.models.families import directory_family
from cvg.models.tiny import tiny_cogvideox_pipeline
from cvg.models.wan import generator_description
from cvg.pipeline import CVGPipeline
from cvg.request import PipelineOptions

SCHEDULERS = ("ddim", "dpm")
# 64 px on the 8x VAE with patch 2: a 4 x 4 token grid; 9 frames: 3 latent frames
SMALL = dict(height=64, width=64, num_frames=9, num_inference_steps=6, max_sequence_length=32)


@functools.cache
def _shared(scheduler: str):
    """A tiny CogVideoX pipeline with this scheduler (shared: tests must not modify it)."""
    return tiny_cogvideox_pipeline(seed=0, scheduler=scheduler)


@pytest.fixture(params=SCHEDULERS)
def cogvideox(request):
    return _shared(request.param)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
@pytest.mark.parametrize("batch_cfg", [None, False])
def test_without_guidance_it_is_cogvideox_pipeline(scheduler, guidance_scale, batch_cfg):
    pipe = _shared(scheduler)
    prompts = ["a red cube to the left of a blue ball", "a green ball moves up"]
    kw = dict(SMALL, guidance_scale=guidance_scale, output_type="np")
    reference = pipe(prompts, generator=seeded(3), **kw).frames  # DPM draws noise every step: same generator
    for composition in (None, "red cube and ball"):
        out = CVGPipeline(pipe, options=PipelineOptions(batch_cfg=batch_cfg))(
            prompts, composition, guide_steps=0, generator=seeded(3), **kw
        )
        assert out.frames.shape == reference.shape == (2, 9, 64, 64, 3)
        assert np.abs(out.frames - reference).max() <= 1e-5
        assert out.steps == []


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_guidance_lowers_the_objective(cogvideox, name):
    kind, objective = OBJECTIVES[name]
    for seed in range(5):
        guided = objective_after_guided_steps(cogvideox, kind, objective, seed, 2, SMALL)
        unguided = objective_after_guided_steps(cogvideox, kind, objective, seed, 0, SMALL)
        assert guided < unguided, f"{name}, seed {seed}: guided {guided:.5f} >= unguided {unguided:.5f}"


def test_guided_steps_read_the_joint_attention_and_run_as_diffusers_does(cogvideox):
    calls = []
    hook = cogvideox.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((kwargs["hidden_states"].shape, "image_rotary_emb" in kwargs)),
        with_kwargs=True,
    )
    try:
        config = GuidanceConfig(guide_steps=2, pool=(1, 2, 2))
        out = CVGPipeline(cogvideox, guidance=config)(*PROMPTS["spatial"], generator=seeded(0), **SMALL)
    finally:
        hook.remove()
    heads = cogvideox.transformer.config.num_attention_heads
    assert len(out.maps) == 2 and out.maps[0].shape == (1, 2, heads, 3, 2, 2, len(out.composition.tokens))
    assert all(m.sum(-1).lt(1).all() for m in out.maps)  # shares of the joint softmax, not renormalised
    assert all(rotary for _, rotary in calls) and {s for s, _ in calls} == {(1, 3, 4, 8, 8), (2, 3, 4, 8, 8)}
    assert len(calls) == 2 + 6  # a recorded forward per guided step, then one batched CFG forward per step
    assert out.frames.shape == (1, 9, 64, 64, 3) and np.isfinite(out.frames).all()


def test_solver_steps_as_the_pipeline_and_gives_noise_levels(cogvideox):
    scheduler = type(cogvideox.scheduler).from_config(cogvideox.scheduler.config)
    scheduler.set_timesteps(6)
    solver = CogVideoXSolver(scheduler, seeded(0))
    assert solver.sigmas.shape == (7,) and solver.sigmas[-1] == 0 and solver.sigmas.max() <= 1
    assert (solver.sigmas[:-1] > solver.sigmas[1:]).all()  # falling noise level along the schedule
    alpha = scheduler.alphas_cumprod[scheduler.timesteps[3]].double()  # same signal-to-noise ratio
    assert torch.isclose((1 - solver.sigmas[3].double()) / solver.sigmas[3], (alpha / (1 - alpha)).sqrt(), rtol=1e-5)
    config = GuidanceConfig(guide_sigma=float(solver.sigmas[2]), pool=(1, 1, 1))
    out = CVGPipeline(cogvideox, guidance=config)(
        *PROMPTS["spatial"], generator=seeded(0), output_type="latent", **SMALL
    )
    assert sorted({s.step for s in out.steps}) == [0, 1, 2]  # the steps at or above that noise level


def test_from_pretrained_and_generate(cogvideox, tmp_path, capsys):
    model, out, maps = tmp_path / "model", tmp_path / "out.mp4", tmp_path / "maps.png"
    cogvideox.save_pretrained(str(model))
    assert directory_family(model) == "cogvideox"
    loaded = CVGPipeline.from_pretrained(model)
    assert loaded.family == "cogvideox" and list(loaded.experts) == ["transformer"] and loaded.options.batch_cfg
    a = loaded(*PROMPTS["spatial"], generator=seeded(2), output_type="latent", **SMALL).frames
    b = CVGPipeline(cogvideox)(*PROMPTS["spatial"], generator=seeded(2), output_type="latent", **SMALL).frames
    assert (a - b).abs().max() <= 1e-5
    argv = ["generate", "--model", str(model), "--prompt", PROMPTS["spatial"][0]]
    argv += ["--composition", PROMPTS["spatial"][1], "--out", str(out), "--save-maps", str(maps)]
    argv += ["--height", "64", "--width", "64", "--frames", "9", "--steps", "4", "--pool", "1", "--quiet"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    default = GuidanceConfig()
    assert report["out"] == str(out) and len(report["objective"]) == default.guide_steps * default.iterations
    frames = imageio.mimread(out)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    assert Image.open(maps).width > 3 * 128  # 3 pooled frames, 128 px cells
    bf16 = CVGPipeline.from_pretrained(model, transformer_dtype=torch.bfloat16)
    assert bf16.pipe.transformer.dtype == torch.bfloat16 and bf16.pipe.vae.dtype == torch.float32
    late = bf16(*PROMPTS["spatial"], generator=seeded(2), output_type="latent", **SMALL).frames
    assert late.dtype == torch.float32 and torch.isfinite(late).all()


def test_a_classifier_of_this_generator_guides_it(cogvideox, tmp_path):
    torch.manual_seed(0)
    description = generator_description(cogvideox.transformer, None, (1, 1, 1))
    CompositionClassifier(ClassifierConfig(layers=2, tiles=(3, 4, 4), generator=description)).save_pretrained(
        tmp_path / "head"
    )
    cvg = CVGPipeline(cogvideox, guidance=GuidanceConfig(guide_steps=2, pool=(1, 1, 1)))
    cvg.load_classifier(tmp_path / "head")
    assert cvg.classifier_expert == "transformer"
    out = cvg(*PROMPTS["spatial"], generator=seeded(0), output_type="latent", **SMALL)
    assert len(out.objective_values) == 2
    wan_head = CVGPipeline(tiny_cogvideox_pipeline(seed=1), guidance=GuidanceConfig(pool=(1, 1, 1)))
    with pytest.raises(ValueError, match="trained for another generator"):
        wan_head.load_classifier(tmp_path / "head")


def test_what_cogvideox_cannot_run_is_a_one_line_error(cogvideox, tmp_path, capsys):
    kw = dict(SMALL, output_type="latent", generator=seeded(0))
    eager_only = "^cogvideox runs eager forwards: step backends and caches are for Wan pipelines$"
    with pytest.raises(ValueError, match=eager_only):
        CVGPipeline(cogvideox, options=PipelineOptions(step_backend="torch"))(*PROMPTS["spatial"], **kw)
    with pytest.raises(ValueError, match="guidance_scale_2 is for two-expert Wan 2.2 pipelines"):
        CVGPipeline(cogvideox)("a red cube", None, guidance_scale_2=3.0, **kw)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16, got 72"):
        CVGPipeline(cogvideox)("a red cube", None, **{**kw, "height": 72})
    with pytest.raises(ValueError, match=r"pool \(4, 1, 1\) is wider than the token grid \(3, 4, 4\) along frames"):
        CVGPipeline(cogvideox, guidance=GuidanceConfig(pool=(4, 1, 1)))(*PROMPTS["spatial"], **kw)
    with pytest.raises(ValueError, match="read_sigma needs a flow-matching family"):
        CVGPipeline(cogvideox, guidance=GuidanceConfig(read_sigma=0.5))(*PROMPTS["spatial"], **kw)
    model = tmp_path / "model"
    cogvideox.save_pretrained(str(model))
    argv = ["generate", "--model", str(model), "--prompt", "a red cube", "--out", str(tmp_path / "x.mp4")]
    assert main([*argv, "--engine", "torch", "--quiet", "--height", "64", "--width", "64", "--frames", "9"]) == 2
    assert "cogvideox runs eager forwards" in capsys.readouterr().err
    (model / "transformer" / "config.json").write_text(json.dumps({"_class_name": "CogVideoXTransformer3DModel"}))
    with pytest.raises(ValueError, match="^cannot load the CogVideoX pipeline in .*"):
        CVGPipeline.from_pretrained(model)
