"""Wan 2.2's layouts on tiny configs: two experts split at `boundary_ratio` (A14B) and per-token timesteps
with the 48-channel VAE (TI2V-5B). Without guidance each is WanPipeline's own output; guidance lowers every
objective; each expert serves its timesteps, guided steps included; bad layouts are one-line errors."""

import functools
import json
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from guided import OBJECTIVES, PROMPTS, objective_after_guided_steps
from guided import seeded as _seeded
from PIL import Image

from cvg.cli import main
from cvg.guidance.classifier import ClassifierConfig, CompositionClassifier
from cvg.guidance.config import GuidanceConfig
from cvg.models.families import directory_family
from cvg.models.tiny import tiny_wan_pipeline
from cvg.models.wan import generator_description
from cvg.pipeline import CVGPipeline
from cvg.request import PipelineOptions

WAN22 = ("wan2.2-a14b", "wan2.2-ti2v")
# TI2V's VAE is 16x spatial: 128 px gives the same 4x4 token grid as 64 px on Wan 2.1's 8x VAE
SIZES = {"wan2.2-a14b": 64, "wan2.2-ti2v": 128}


@functools.cache
def _shared(family):
    """A tiny Wan 2.2 pipeline of this layout (shared: tests must not modify it)."""
    return tiny_wan_pipeline(seed=0, family=family)


@pytest.fixture(params=WAN22)
def wan22(request):
    return _shared(request.param)


def _small(pipe) -> dict:
    size = SIZES[CVGPipeline(pipe).family]
    return dict(height=size, width=size, num_frames=9, num_inference_steps=6, max_sequence_length=64)


def test_the_tiny_layouts_are_wan22s():
    a14b = tiny_wan_pipeline(family="wan2.2-a14b")
    assert a14b.transformer_2 is not None and a14b.config.boundary_ratio == 0.875
    assert a14b.transformer_2.state_dict()["proj_out.weight"].ne(a14b.transformer.state_dict()["proj_out.weight"]).any()
    ti2v = tiny_wan_pipeline(family="wan2.2-ti2v")
    assert ti2v.config.expand_timesteps and ti2v.vae.config.z_dim == ti2v.transformer.config.in_channels == 48
    assert ti2v.vae_scale_factor_spatial == 16
    with pytest.raises(ValueError, match="family must be one of wan2.1, wan2.2-a14b, wan2.2-ti2v, got 'wan3'"):
        tiny_wan_pipeline(family="wan3")


@pytest.mark.parametrize(
    ("family", "guidance_scale", "guidance_scale_2"),
    [(family, 5.0, None) for family in WAN22] + [(family, 1.0, None) for family in WAN22] + [("wan2.2-a14b", 5.0, 2.0)],
)
def test_without_guidance_it_is_wan_pipeline(family, guidance_scale, guidance_scale_2):
    wan22 = _shared(family)
    prompts = ["a red cube to the left of a blue ball", "a green ball moves up"]
    kw = dict(_small(wan22), guidance_scale=guidance_scale, num_videos_per_prompt=2, output_type="np")
    if guidance_scale_2 is not None:
        kw["guidance_scale_2"] = guidance_scale_2
    reference = wan22(prompts, generator=_seeded(3), **kw).frames
    for composition in (None, "red cube and ball"):
        out = CVGPipeline(wan22)(prompts, composition, guide_steps=0, generator=_seeded(3), **kw)
        assert out.frames.shape == reference.shape and out.frames.shape[:2] == (4, 9)
        assert np.abs(out.frames - reference).max() <= 1e-5
        assert out.steps == []


def _calls(pipe) -> dict[str, list[tuple[float, bool]]]:
    """Per expert, the (timestep, with gradient) of every forward it runs from now on."""
    calls = {name: [] for name in CVGPipeline(pipe).experts}
    for name, model in CVGPipeline(pipe).experts.items():
        model.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: calls[name].append(
                (float(kwargs["timestep"].flatten()[0]), torch.is_grad_enabled())
            ),
            with_kwargs=True,
        )
    return calls


def test_each_expert_serves_its_timesteps_guided_steps_included():
    pipe = tiny_wan_pipeline(seed=0, family="wan2.2-a14b")  # its own: hooks are added
    calls = _calls(pipe)
    boundary = 0.875 * pipe.scheduler.config.num_train_timesteps
    cvg = CVGPipeline(pipe, guidance=GuidanceConfig(guide_steps=4, pool=(1, 1, 1)))
    out = cvg(*PROMPTS["spatial"], generator=_seeded(0), output_type="latent", **_small(pipe))
    timesteps = pipe.scheduler.timesteps.tolist()
    high = [t for t in timesteps if t >= boundary]
    assert 0 < len(high) < 4  # the guided window crosses the boundary
    assert all(t >= boundary for t, _ in calls["transformer"]) and all(t < boundary for t, _ in calls["transformer_2"])
    assert sorted({t for t, _ in calls["transformer"]}) == sorted(high)
    assert sorted({t for t, _ in calls["transformer_2"]}) == sorted(set(timesteps) - set(high))
    guided = {name: sorted({t for t, grad in c if grad}) for name, c in calls.items()}
    assert guided["transformer"] == sorted(high) and guided["transformer_2"] == [timesteps[3]]
    assert len(out.steps) == 4


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_guidance_lowers_the_objective(wan22, name):
    kind, objective = OBJECTIVES[name]
    for seed in range(5):
        guided = objective_after_guided_steps(wan22, kind, objective, seed, 2, _small(wan22))
        unguided = objective_after_guided_steps(wan22, kind, objective, seed, 0, _small(wan22))
        assert wan22.scheduler.timesteps[2] >= 0.875 * 1000  # Wan 2.2 A14B: read by the high-noise expert
        assert guided < unguided, f"{name}, seed {seed}: guided {guided:.5f} >= unguided {unguided:.5f}"


def test_ti2v_gives_every_token_the_steps_timestep():
    pipe = tiny_wan_pipeline(seed=0, family="wan2.2-ti2v")
    shapes = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: shapes.append(tuple(kwargs["timestep"].shape)), with_kwargs=True
    )
    cvg = CVGPipeline(pipe, guidance=GuidanceConfig(guide_steps=1, pool=(1, 1, 1)))
    cvg(*PROMPTS["spatial"], generator=_seeded(0), output_type="latent", guidance_scale=1.0, **_small(pipe))
    assert set(shapes) == {(1, 3 * 4 * 4)}  # 3 latent frames x 4 x 4 tokens, guided forward included


@pytest.mark.parametrize("batch_cfg", [False, True])
def test_each_expert_runs_on_its_own_engine(wan22, batch_cfg):
    kw = dict(_small(wan22), guidance_scale=5.0, output_type="latent")
    eager = CVGPipeline(wan22)(*PROMPTS["spatial"], guide_steps=2, generator=_seeded(1), **kw)
    cvg = CVGPipeline(
        wan22,
        guidance=GuidanceConfig(pool=(1, 2, 2)),
        options=PipelineOptions(step_backend="torch", batch_cfg=batch_cfg),
    )
    out = cvg(*PROMPTS["spatial"], guide_steps=2, generator=_seeded(1), **kw)
    assert sorted(expert for _, expert, _ in cvg.steps.backends) == sorted(cvg.experts)
    assert (out.frames - eager.frames).abs().max() <= 1e-4  # the engine drops padding: float rounding


def test_from_pretrained_and_bad_layouts(wan22, tmp_path, capsys):
    path = tmp_path / "wan22"
    wan22.save_pretrained(str(path))
    family = CVGPipeline(wan22).family
    assert directory_family(path) == family
    loaded = CVGPipeline.from_pretrained(path)
    assert loaded.family == family and sorted(loaded.experts) == sorted(CVGPipeline(wan22).experts)
    kw = dict(_small(wan22), output_type="latent", generator=_seeded(2))
    a = loaded("a red cube", None, **kw).frames
    kw["generator"] = _seeded(2)
    assert (a - CVGPipeline(wan22)("a red cube", None, **kw).frames).abs().max() <= 1e-5
    if family == "wan2.2-a14b":
        shutil.rmtree(path / "transformer_2")
        with pytest.raises(
            ValueError, match=r"^the wan2.2-a14b pipeline in .* lacks transformer_2, its low-noise expert$"
        ):
            CVGPipeline.from_pretrained(path)
        with pytest.raises(ValueError, match="needs transformer_2, its low-noise expert; it is None"):
            CVGPipeline(type(wan22)(**{**wan22.components, "transformer_2": None}, boundary_ratio=0.875))
    else:
        with pytest.raises(ValueError, match="guidance_scale_2 is for two-expert Wan 2.2 pipelines"):
            CVGPipeline(wan22)("a red cube", None, guidance_scale_2=3.0, **kw)
        argv = ["generate", "--model", str(path), "--prompt", "a red cube", "--out", str(tmp_path / "x.mp4")]
        assert main([*argv, "--guidance-scale-2", "3", "--quiet"]) == 2
        assert "guidance_scale_2 is for two-expert Wan 2.2 pipelines" in capsys.readouterr().err
    index = json.loads((path / "model_index.json").read_text())
    for entry in ([], ["diffusers"], None):  # a hand-edited index: one line naming what is missing
        (path / "model_index.json").write_text(json.dumps({**index, "transformer": entry}))
        with pytest.raises(ValueError, match=r"^the wan2\S* pipeline in .* lacks transformer, its transformer$"):
            CVGPipeline.from_pretrained(path)
    (path / "model_index.json").write_text(json.dumps({**index, "_class_name": "HunyuanVideoPipeline"}))
    with pytest.raises(ValueError, match=r"holds a HunyuanVideoPipeline; cvg guides WanPipeline, CogVideoXPipeline "):
        CVGPipeline.from_pretrained(path)


def test_a_classifier_reads_the_expert_it_was_trained_on(tmp_path):
    pipe = tiny_wan_pipeline(seed=0, family="wan2.2-a14b")
    config = GuidanceConfig(guide_steps=2, pool=(1, 1, 1))
    kw = dict(_small(pipe), output_type="latent", generator=_seeded(0))
    for expert, model in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2)):
        directory = tmp_path / expert
        torch.manual_seed(0)
        classifier = ClassifierConfig(
            layers=2, tiles=(3, 4, 4), generator=generator_description(model, None, (1, 1, 1))
        )
        CompositionClassifier(classifier).save_pretrained(directory)
        cvg = CVGPipeline(pipe, guidance=config)
        cvg.load_classifier(directory)
        assert cvg.classifier_expert == expert
        if expert == "transformer":
            assert len(cvg(*PROMPTS["spatial"], **kw).objective_values) == 2
            with pytest.raises(ValueError, match="guided steps run on transformer_2 .* guide fewer steps$"):
                cvg(*PROMPTS["spatial"], guide_steps=4, **kw)
        else:
            with pytest.raises(
                ValueError, match="^the classifier reads transformer_2's maps, but guided steps run on transformer "
            ):
                cvg(*PROMPTS["spatial"], **kw)
    other = CVGPipeline(tiny_wan_pipeline(seed=1, family="wan2.2-a14b"), guidance=config)
    with pytest.raises(ValueError, match="trained for another generator"):
        other.load_classifier(tmp_path / "transformer")


def test_generate_writes_a_video_and_maps(wan22, tmp_path, capsys):
    model, out, maps = tmp_path / "model", tmp_path / "out.mp4", tmp_path / "maps.png"
    wan22.save_pretrained(str(model))
    size = str(_small(wan22)["height"])
    argv = [
        "generate",
        "--model",
        str(model),
        "--prompt",
        PROMPTS["spatial"][0],
        "--composition",
        PROMPTS["spatial"][1],
    ]
    argv += ["--out", str(out), "--save-maps", str(maps), "--height", size, "--width", size, "--frames", "9"]
    argv += ["--steps", "4", "--pool", "1", "--quiet", "--max-sequence-length", "64"]
    if CVGPipeline(wan22).family == "wan2.2-a14b":
        argv += ["--guidance-scale-2", "3"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    default = GuidanceConfig()
    assert report["out"] == str(out) and len(report["objective"]) == default.guide_steps * default.iterations
    frames = imageio.mimread(out)
    assert len(frames) == 9 and frames[0].shape == (int(size), int(size), 3)
    assert Image.open(maps).width > 3 * 128  # 3 pooled frames, 128 px cells


def test_every_adapter_keeps_the_family_adapter_contract():
    """Each adapter has every member `FamilyAdapter` declares, methods with the declared parameters."""
    import inspect

    from cvg.models.families import ADAPTERS, FamilyAdapter

    declared = {n for n in vars(FamilyAdapter) if not n.startswith("_")} | set(FamilyAdapter.__annotations__)
    for adapter in ADAPTERS:
        for name in declared:
            assert hasattr(adapter, name), (adapter.__name__, name)
            contract = getattr(FamilyAdapter, name, None)
            if callable(contract):
                want = list(inspect.signature(contract).parameters)
                assert list(inspect.signature(getattr(adapter, name)).parameters) == want, (adapter.__name__, name)


def test_both_map_recorders_keep_the_recorder_contract():
    """Wan's and CogVideoX's recorders have every member `AttentionMapRecorder` declares, methods with the
    declared parameters (one `set_grid(grid, device)`, one `spec(keys, device)`)."""
    import inspect

    from cvg.models.families import AttentionMapRecorder
    from cvg.models.joint_attention import JointMapRecorder
    from cvg.models.processors import MapRecorder

    methods = {n: f for n, f in vars(AttentionMapRecorder).items() if not n.startswith("_") and callable(f)}
    for recorder in (MapRecorder, JointMapRecorder):
        assert set(AttentionMapRecorder.__annotations__) <= set(recorder.__dataclass_fields__), recorder
        for name, contract in methods.items():
            assert (
                inspect.signature(getattr(recorder, name)).parameters.keys()
                == inspect.signature(contract).parameters.keys()
            )
