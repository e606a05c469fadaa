"""Dual-inversion classifier training: readings of real clips on a tiny Wan pipeline, caching, and the
leakage that single readings learn and dual readings do not (on synthetic maps with a known leak)."""

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from processes import kill_when

from cvg.guidance.classifier import label_of
from cvg.guidance.config import GuidanceConfig
from cvg.guidance.sampler import Denoiser
from cvg.io.files import LockedError, locked
from cvg.io.video import to_uint8
from cvg.models.wan import MANIFEST, load_wan_pipeline
from cvg.pipeline import CVGPipeline
from cvg_research.compshapes.dataset import read_index, split_clip, write_dataset
from cvg_research.compshapes.grammar import Clip, novel_composition
from cvg_research.compshapes.judge import judge
from cvg_research.training import dual_inversion, readings
from cvg_research.training.config import ReadingConfig, TrainingConfig
from cvg_research.training.dual_inversion import evaluate_readings, train_classifier
from cvg_research.training.readings import Readings

SIZE = {"frames": 9, "height": 64, "width": 64}
CONFIG = ReadingConfig(num_inference_steps=10, guide_steps=2, substeps=2, max_sequence_length=64)


def _clips(count, category="spatial"):
    return [split_clip(0, i, category, "train", **SIZE) for i in range(count)]


def test_guided_levels_follow_the_pipelines_scheduler(tiny_pipe):
    sigmas, timesteps = readings.guided_levels(tiny_pipe, CONFIG)
    scheduler = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(10)
    assert sigmas == scheduler.sigmas[:2].tolist() and timesteps == scheduler.timesteps[:2].tolist()


def test_a_clip_is_read_under_its_prompt_and_its_counterfactual(tiny_pipe):
    clip, frames = next(iter(readings.rendered(_clips(1))))
    true, counterfactual = readings.read_clip(tiny_pipe, clip, frames, CONFIG, dual=True)
    layers = len(tiny_pipe.transformer.blocks)
    heads = tiny_pipe.transformer.config.num_attention_heads
    # steps, layers, heads, tiles f/h/w, 2 entity slots then 4 word slots
    assert true.shape == counterfactual.shape == (2, layers, heads, 3, 2, 2, 6)
    assert not torch.allclose(true, counterfactual)  # another prompt, another inversion and reading
    assert (true > 0).all() and torch.isfinite(true).all()
    (single,) = readings.read_clip(tiny_pipe, clip, frames, CONFIG, dual=False)
    torch.testing.assert_close(single, true)


def test_a_replay_inverts_the_clip_to_noise_and_reads_the_path_back_down(tiny_pipe):
    """Invert-and-replay: maps at the guided steps of the sampler's path from the clip's inverted noise,
    under each prompt; the inversion's error shrinks as its Euler steps grow (first order)."""
    clip, frames = next(iter(readings.rendered(_clips(1))))
    errors = []
    for substeps in (4, 16):
        config = replace(CONFIG, source="replay", replay_substeps=substeps)
        (true, counterfactual), quality = readings.read_replay(tiny_pipe, clip, frames, config, dual=True)
        layers, heads = len(tiny_pipe.transformer.blocks), tiny_pipe.transformer.config.num_attention_heads
        assert true.shape == counterfactual.shape == (2, layers, heads, 3, 2, 2, 6)
        assert not torch.allclose(true, counterfactual) and torch.isfinite(true).all()
        assert quality.shape == (3,) and torch.isfinite(quality).all()
        errors.append(quality[2].item())
    assert errors[1] < 0.6 * errors[0]


def test_only_well_inverted_clips_are_kept():
    quality = torch.tensor([[1.0, 0.0, 0.01], [1.3, 0.0, 0.01], [1.0, 2.0, 0.01], [1.05, -0.2, 0.2]])
    kept = Readings(torch.zeros(4, 2, 1, 1, 1, 1, 1, 1, 6), ["a"] * 4, ["b"] * 4, ["x"] * 4, quality=quality)
    config = replace(CONFIG, replay_max_std_error=0.15, replay_max_kurtosis=0.5, replay_max_error=0.05)
    assert kept.well_inverted(config) == [True, False, False, False]
    assert kept.where([True, False, True, False]).quality.tolist() == quality[[0, 2]].tolist()
    summary = dual_inversion.inversion_summary(kept, config)
    assert summary["kept"] == 1 and summary["clips"] == 4 and summary["std"] == pytest.approx(1.0875)
    assert dual_inversion.inversion_summary(replace(kept, quality=None), config) is None


def test_readings_are_cached_and_resumed(tiny_pipe, tmp_path, monkeypatch):
    clips = _clips(3, "motion")  # one entity: the second slot stays empty
    first = readings.read_clips(tiny_pipe, readings.rendered(clips), CONFIG, tmp_path, chunk=2, report=lambda _: None)
    assert first.maps.shape[:3] == (3, 2, 2) and first.maps[..., [1, 4, 5]].abs().max() == 0  # no second entity
    assert first.true_labels[0] == clips[0].composition.label
    assert first.counterfactual_labels[0] == clips[0].counterfactuals[0][1].label
    monkeypatch.setattr(readings, "read_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    again = readings.read_clips(tiny_pipe, readings.rendered(clips), CONFIG, tmp_path, chunk=2, report=lambda _: None)
    assert torch.equal(again.maps, first.maps) and again.true_labels == first.true_labels
    with pytest.raises(AssertionError, match="re-read"):  # other clips in the same place are read, not reused
        readings.read_clips(
            tiny_pipe, readings.rendered(_clips(3, "spatial")), CONFIG, tmp_path, chunk=2, report=lambda _: None
        )


def test_a_trajectory_is_read_where_the_sampler_passes(tiny_pipe):
    """The readings of a generated clip are the maps at the latents the sampler visits (step 0: the noise
    itself), under its prompt and its counterfactual; the targets are the judge's verdicts on the clip."""
    clip = _clips(1)[0]
    config = replace(CONFIG, guide_steps=3)
    maps, targets = readings.read_trajectory(tiny_pipe, clip, config, seed=5)
    layers = len(tiny_pipe.transformer.blocks)
    heads = tiny_pipe.transformer.config.num_attention_heads
    assert maps.shape == (2, 3, layers, heads, 3, 2, 2, 6) and targets.dtype == torch.bool and targets.shape == (2,)
    pipe = CVGPipeline(tiny_pipe)
    size = {"height": SIZE["height"], "width": SIZE["width"], "num_frames": SIZE["frames"]}
    visited = []
    out = pipe(
        clip.prompt,
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=10,
        max_sequence_length=64,
        on_step=lambda i, t, x: visited.append(x.clone()),
        **size,
    )
    frames = to_uint8(out.frames[0])
    assert targets.tolist() == [judge(frames, clip.composition).ok, judge(frames, clip.counterfactuals[0][1]).ok]
    embeds = tiny_pipe.encode_prompt(clip.prompt, do_classifier_free_guidance=False, max_sequence_length=64)[0]
    bound = pipe.bind(clip.prompt, clip.composition, 64)
    denoiser = Denoiser(tiny_pipe.transformer, embeds, None, 1.0)
    timesteps = readings.guided_levels(tiny_pipe, config)[1]
    channels = tiny_pipe.transformer.config.in_channels
    noise = tiny_pipe.prepare_latents(
        1,
        channels,
        SIZE["height"],
        SIZE["width"],
        SIZE["frames"],
        torch.float32,
        "cpu",
        torch.Generator().manual_seed(5),
    )
    for step, latents in enumerate([noise, visited[0], visited[1]]):
        read = denoiser.read_maps(latents, torch.tensor(timesteps[step]), bound, GuidanceConfig(pool=config.pool))
        torch.testing.assert_close(maps[0, step, ..., :2], bound.entity_maps(read)[0], rtol=0, atol=0)
        torch.testing.assert_close(maps[0, step, ..., 2:], bound.word_maps(read)[0], rtol=0, atol=0)


class _Labels:
    dim = 2

    def __call__(self, labels):
        return torch.tensor([[1.0, 0.0] if "left" in t else [0.0, 1.0] for t in labels])


def _leaky_readings(n: int, seed: int) -> Readings:
    """Maps whose entity mass sits left or right as the clip shows (noisy), and high or low as the
    reading prompt says (clean): the prompt leaks into the maps, as it does in a real generator."""
    g = torch.Generator().manual_seed(seed)
    clip_left = torch.rand(n, generator=g) < 0.5
    maps = torch.full((n, 2, 1, 1, 1, 1, 2, 2, 6), 0.1)
    for reading in range(2):
        prompt_left = clip_left if reading == 0 else ~clip_left
        column = torch.where(clip_left, 0, 1)
        row = torch.where(prompt_left, 0, 1)
        for i in range(n):
            for slot in (0, 2):  # the first entity, and its noun
                maps[i, reading, 0, 0, 0, 0, :, column[i], slot] += 0.5 + 0.6 * torch.rand((), generator=g)  # clip
                maps[i, reading, 0, 0, 0, 0, row[i], :, slot] += 2.0  # prompt: strong, clean
    maps = maps + 0.3 * torch.rand(maps.shape, generator=g)
    true = ["cube moves left" if c else "cube moves right" for c in clip_left]
    cf = ["cube moves right" if c else "cube moves left" for c in clip_left]
    return Readings(maps, true, cf, ["motion"] * n, timesteps=torch.tensor([999.0]))


def test_dual_readings_remove_the_leakage_single_readings_learn():
    train, held = _leaky_readings(400, 0), _leaky_readings(200, 1)
    config = TrainingConfig(epochs=60, batch=64, lr=3e-3, hidden_dim=32)
    results = {}
    for dual in (True, False):
        model = train_classifier(
            train, {}, TrainingConfig(**{**config.__dict__, "dual": dual}), _Labels(), report=lambda _: None
        )
        results[dual] = evaluate_readings(model, held, _Labels())["overall"]
    assert results[True]["accuracy"] > 0.95 and results[True]["leakage"] < 0.1
    assert results[False]["leakage"] > 0.5  # it reads the prompt back out of the maps


class _DirectionLabels:
    """A stand-in label encoder: one axis per direction word, so a family's four labels differ."""

    dim = 4

    def __call__(self, labels):
        words = ("left", "right", "up", "down")
        return torch.stack([torch.tensor([float(w in t.split()) for w in words]) for t in labels])


def test_a_multiclass_head_learns_the_label_shown_among_its_family_without_the_leak():
    train, held = _leaky_readings(400, 0), _leaky_readings(200, 1)
    config = TrainingConfig(epochs=60, batch=64, lr=3e-3, hidden_dim=32, objective="multiclass")
    model = train_classifier(train, {}, config, _DirectionLabels(), report=lambda _: None)
    assert model.config.objective == "multiclass" and model.config.confidence == pytest.approx(0.9 + 0.1 / 4)
    result = evaluate_readings(model, held, _DirectionLabels())["overall"]
    assert result["accuracy"] > 0.95 and result["leakage"] < 0.1
    maps = held.inputs("entities", per_head=False)[:, 0].flatten(0, 1)
    family = _DirectionLabels()(["cube moves left", "cube moves right", "cube moves up", "cube moves down"])
    with torch.no_grad():
        chosen = model.scores(maps, family, torch.tensor(999.0)).argmax(-1)
    shown = torch.tensor([0 if t.endswith("left") else 1 for t in held.true_labels])
    assert (chosen == shown).float().mean() > 0.95  # never up or down, which no reading shows


def test_family_examples_keep_the_label_shown_and_drop_what_no_family_decides():
    maps = torch.zeros(4, 1, 1, 1, 1, 1, 1, 1, 6)
    true = ["cube moves left", "red cube left of blue ball", "cube moves up", "red cube"]
    counterfactual = ["cube moves right", "red cube above blue ball", "cube moves down", "blue cube"]
    targets = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    readings = Readings(maps, true, counterfactual, ["motion", "spatial", "motion", "object"], targets)
    _, families, index, _ = dual_inversion._family_examples(readings, TrainingConfig())
    # the counterfactual shown, twice; both shown (undecided) and a family of one are dropped
    assert [f[0] for f in families] == ["cube moves left", "red cube left of blue ball"]
    assert index.tolist() == [1, 2]  # "cube moves right" and "red cube above blue ball" in their families


def test_the_paper_head_learns_from_the_same_readings_without_the_leak():
    """Per-head word maps through the transformer aggregator, trained on the readings the MLP head reads."""
    train, held = _leaky_readings(400, 0), _leaky_readings(200, 1)
    config = TrainingConfig(
        epochs=30, batch=64, lr=3e-3, hidden_dim=32, per_head=True, channels="words", aggregator="transformer"
    )
    model = train_classifier(train, {}, config, _Labels(), report=lambda _: None)
    assert (model.config.aggregator, model.config.channels, model.config.heads) == ("transformer", "words", 1)
    result = evaluate_readings(model, held, _Labels())["overall"]
    assert result["accuracy"] > 0.9 and result["leakage"] < 0.1


def test_label_smoothing_keeps_the_head_from_saturating():
    """Unsmoothed, a separable training set drives logits (and so -log p, the guidance objective) to
    saturation; smoothed targets eps/2, 1 - eps/2 hold them near log((1 - eps/2) / (eps/2))."""
    train = _leaky_readings(400, 0)
    maps = train.inputs("entities", per_head=False).flatten(0, 2)
    labels = _Labels()(train.true_labels).repeat_interleave(2, 0)
    magnitude = {}
    for eps in (0.0, 0.2):
        config = TrainingConfig(epochs=60, batch=64, lr=3e-3, hidden_dim=32, label_smoothing=eps)
        model = train_classifier(train, {}, config, _Labels(), report=lambda _: None)
        with torch.no_grad():
            magnitude[eps] = model(maps, labels, torch.tensor(999.0)).abs().median().item()
    assert magnitude[0.0] > 6.0
    assert abs(magnitude[0.2] - math.log(0.9 / 0.1)) < 0.5


@pytest.mark.parametrize("source", ["trajectory", "inversion", "replay"])
def test_train_and_evaluate_saves_three_classifiers_and_resumes(tiny_model_dir, tmp_path, monkeypatch, source):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / MANIFEST).write_text(json.dumps({"recipe": {"size": SIZE["height"], "frames": SIZE["frames"]}}))
    trained_on = {}

    def spy(readings, generator, config, encoder, report):
        trained_on.setdefault(config.dual, []).append(readings)
        return train_classifier(readings, generator, config, encoder, report)

    monkeypatch.setattr(dual_inversion, "train_classifier", spy)
    training = TrainingConfig(epochs=2, batch=16, hidden_dim=16, label_smoothing=0.1)
    out = tmp_path / "classifier"
    held = tmp_path / "held"  # measured on a dataset folder, trained on fresh renders: both sources
    write_dataset(held, 4, 5, ("spatial", "attribute"), SIZE["frames"], SIZE["height"], SIZE["width"], "dev")
    reading = replace(CONFIG, source=source)
    if source == "replay":  # a random tiny model inverts poorly: keep every clip here
        reading = replace(reading, replay_substeps=4, replay_max_std_error=1e9, replay_max_kurtosis=1e9)
        reading = replace(reading, replay_max_error=1e9)
    run = dict(clips=8, heldout=4, reading=reading, training=training, report=lambda _: None, heldout_data=held)
    summary = dual_inversion.train_and_evaluate(model, out, **run)
    assert summary["heldout_data"] == str(held) and summary["clips"] == 8
    inverted = summary["inversions"]["train"]
    assert (inverted["kept"], inverted["clips"]) == (8, 8) if source == "replay" else inverted is None
    assert set(summary["heldout_results"]) == {"dual", "single", "transfer"}
    dual, transfer = trained_on[True]
    held_clips = [Clip.from_record(r) for r in read_index(held)]
    novel = [novel_composition(c.category, label_of(c.composition)) for c in held_clips]
    assert [summary["heldout_results"][head]["overall"]["clips"] for head in ("dual", "single", "transfer")] == [
        4,
        4,
        sum(novel),  # the transfer head is measured on the novel compositions alone
    ]
    assert any(dual.novel())  # some training clips state a novel composition ...
    kept = [i for i, n in enumerate(dual.novel()) if not n]  # ... the transfer head trains on all the others
    assert transfer.true_labels == [dual.true_labels[i] for i in kept] and not any(transfer.novel())
    assert torch.equal(transfer.maps, dual.maps[kept])
    pipe = CVGPipeline(load_wan_pipeline(model))
    for directory in (out, out / dual_inversion.SINGLE_READING, out / dual_inversion.LABEL_TRANSFER):
        pipe.load_classifier(directory)  # bound to this generator
    reader = {"trajectory": "read_trajectory", "inversion": "read_clip", "replay": "read_replay"}[source]
    monkeypatch.setattr(readings, reader, lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    again = dual_inversion.train_and_evaluate(model, out, **run)
    assert again["heldout_results"] == summary["heldout_results"]  # readings reused, training deterministic
    with pytest.raises(ValueError, match="the generator makes 9x64x64 videos"):
        write_dataset(tmp_path / "small", 1, 0, ("spatial",), 9, 32, 32)
        dual_inversion.train_and_evaluate(model, out, **{**run, "heldout_data": tmp_path / "small"})


def _model_with_manifest(tiny_model_dir, directory):
    shutil.copytree(tiny_model_dir, directory)
    (directory / MANIFEST).write_text(json.dumps({"recipe": {"size": SIZE["height"], "frames": SIZE["frames"]}}))
    return directory


def test_a_killed_trainer_resumes_with_every_reading_once(tiny_model_dir, tmp_path):
    """`cvg train-classifier` killed at drawn moments while it reads, then run to the end: the readings and
    the three heads are those of one uninterrupted run, and no killed writer's temporary is left."""
    model = _model_with_manifest(tiny_model_dir, tmp_path / "model")
    argv = [
        sys.executable,
        "-m",
        "cvg",
        "train-classifier",
        "--model",
        str(model),
        "--clips",
        "4",
        "--heldout",
        "1",
        "--chunk",
        "1",
        "--steps",
        "4",
        "--guide-steps",
        "2",
        "--epochs",
        "2",
        "--hidden-dim",
        "16",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run([*argv, "--out", str(whole)], capture_output=True).returncode == 0

    def readings(out):
        return sorted(p.relative_to(out) for p in (out / ".work").glob("*/readings-*/*.pt"))

    rng = np.random.default_rng(0)
    for count in (1, 3):
        extra = float(rng.uniform(0, 0.3))
        kill_when([*argv, "--out", str(killed)], lambda count=count: len(readings(killed)) >= count, extra)
        assert 0 < len(readings(killed)) < 5  # killed mid-job
    done = subprocess.run([*argv, "--out", str(killed)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert readings(killed) == readings(whole) and len(readings(whole)) == 5  # 4 training and 1 held-out chunks
    for name in readings(whole):
        ours, theirs = torch.load(killed / name, weights_only=True), torch.load(whole / name, weights_only=True)
        assert ours.keys() == theirs.keys() and torch.equal(ours["maps"], theirs["maps"])
        assert torch.equal(ours["targets"], theirs["targets"]) and ours["seeds"] == theirs["seeds"]
    assert not list((killed / ".work").rglob(".*.tmp*"))
    results = [json.loads((out / "training.json").read_text())["heldout_results"] for out in (whole, killed)]
    assert results[0] == results[1]


def test_a_second_trainer_on_one_output_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "classifier"
    out.mkdir()
    with locked(out / dual_inversion.LOCK), pytest.raises(LockedError, match=rf"pid {os.getpid()}\)"):
        dual_inversion.train_and_evaluate(tiny_model_dir, out, clips=1, heldout=0, report=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == [dual_inversion.LOCK]  # nothing read or written
