"""Dual-inversion classifier training: readings of real clips on a tiny Wan pipeline, caching, and the
leakage that single readings learn and dual readings do not (on synthetic maps with a known leak)."""

import torch

from cvg import dual_inversion
from cvg.compshapes.dataset import split_clip
from cvg.dual_inversion import ReadingConfig, Readings, TrainingConfig, evaluate_readings, train_classifier

SIZE = {"frames": 9, "height": 64, "width": 64}
CONFIG = ReadingConfig(num_inference_steps=10, guide_steps=2, substeps=2, max_sequence_length=64)


def _clips(count, category="spatial"):
    return [split_clip(0, i, category, "train", **SIZE) for i in range(count)]


def test_guided_levels_follow_the_pipelines_scheduler(tiny_pipe):
    sigmas, timesteps = dual_inversion.guided_levels(tiny_pipe, CONFIG)
    scheduler = type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config)
    scheduler.set_timesteps(10)
    assert sigmas == scheduler.sigmas[:2].tolist() and timesteps == scheduler.timesteps[:2].tolist()


def test_a_clip_is_read_under_its_prompt_and_its_counterfactual(tiny_pipe):
    clip, frames = next(iter(dual_inversion.rendered(_clips(1))))
    true, counterfactual = dual_inversion.read_clip(tiny_pipe, clip, frames, CONFIG, dual=True)
    layers = len(tiny_pipe.transformer.blocks)
    assert true.shape == counterfactual.shape == (2, layers, 3, 2, 2, 2)  # steps, layers, tiles f/h/w, entities
    assert not torch.allclose(true, counterfactual)  # another prompt, another inversion and reading
    assert (true > 0).all() and torch.isfinite(true).all()
    (single,) = dual_inversion.read_clip(tiny_pipe, clip, frames, CONFIG, dual=False)
    torch.testing.assert_close(single, true)


def test_readings_are_cached_and_resumed(tiny_pipe, tmp_path, monkeypatch):
    clips = _clips(3, "motion")  # one entity: the second slot stays empty
    first = dual_inversion.read_clips(tiny_pipe, dual_inversion.rendered(clips), CONFIG, tmp_path, chunk=2,
                                      report=lambda _: None)  # fmt: skip
    assert first.maps.shape[:3] == (3, 2, 2) and first.maps[..., 1].abs().max() == 0
    assert first.true_labels[0] == clips[0].composition.label
    assert first.counterfactual_labels[0] == clips[0].counterfactuals[0][1].label
    monkeypatch.setattr(dual_inversion, "read_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-read")))
    again = dual_inversion.read_clips(tiny_pipe, dual_inversion.rendered(clips), CONFIG, tmp_path, chunk=2,
                                      report=lambda _: None)  # fmt: skip
    assert torch.equal(again.maps, first.maps) and again.true_labels == first.true_labels


class _Labels:
    dim = 2

    def __call__(self, labels):
        return torch.tensor([[1.0, 0.0] if "left" in t else [0.0, 1.0] for t in labels])


def _leaky_readings(n: int, seed: int) -> Readings:
    """Maps whose entity mass sits left or right as the clip shows (noisy), and high or low as the
    reading prompt says (clean): the prompt leaks into the maps, as it does in a real generator."""
    g = torch.Generator().manual_seed(seed)
    clip_left = torch.rand(n, generator=g) < 0.5
    maps = torch.full((n, 2, 1, 1, 1, 2, 2, 2), 0.1)
    for reading in range(2):
        prompt_left = clip_left if reading == 0 else ~clip_left
        column = torch.where(clip_left, 0, 1)
        row = torch.where(prompt_left, 0, 1)
        for i in range(n):
            maps[i, reading, 0, 0, 0, :, column[i], 0] += 0.5 + 0.6 * torch.rand((), generator=g)  # clip: weak, noisy
            maps[i, reading, 0, 0, 0, row[i], :, 0] += 2.0  # prompt: strong, clean
    maps = maps + 0.3 * torch.rand(maps.shape, generator=g)
    true = ["cube moves left" if c else "cube moves right" for c in clip_left]
    cf = ["cube moves right" if c else "cube moves left" for c in clip_left]
    return Readings(maps, true, cf, ["motion"] * n)


def test_dual_readings_remove_the_leakage_single_readings_learn():
    train, held = _leaky_readings(400, 0), _leaky_readings(200, 1)
    config = TrainingConfig(epochs=60, batch=64, lr=3e-3, hidden_dim=32)
    results = {}
    for dual in (True, False):
        model = train_classifier(train, {}, TrainingConfig(**{**config.__dict__, "dual": dual}), _Labels(),
                                 report=lambda _: None)  # fmt: skip
        results[dual] = evaluate_readings(model, held, _Labels())["overall"]
    assert results[True]["accuracy"] > 0.95 and results[True]["leakage"] < 0.1
    assert results[False]["leakage"] > 0.5  # it reads the prompt back out of the maps
