"""The guided sampler's loop: guided updates survive every solver; bounded steps stop where they should."""

from dataclasses import dataclass, replace

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from cvg.guidance.config import GuidanceConfig
from cvg.guidance.objectives import TokenPresence
from cvg.guidance.sampler import denoise, guided_solver, latent_update
from cvg.pipeline import CVGPipeline

STEPS, GUIDED = 10, 3
SHAPE = (1, 4, 3, 4, 4)


def _schedulers():
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {
        "unipc": lambda: UniPCMultistepScheduler(**flow),  # Wan's scheduler, as the shipped generator has it
        "dpm-multistep": lambda: DPMSolverMultistepScheduler(**flow),
        "flow-euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


@dataclass
class _FixedVelocity:
    """A denoiser whose prediction ignores the latent (so only the solver decides what survives) and whose
    guided update adds `delta` at step `at` (the graph slot of `cvg.guidance.sampler.Denoiser`)."""

    delta: torch.Tensor
    at: torch.Tensor

    def predict(self, latents, t, step, sigma, total):
        return torch.randn(SHAPE, generator=torch.Generator().manual_seed(step), dtype=torch.float64)

    def experts_for(self, timesteps):
        return [self] * len(timesteps)

    def graph(self, latents, t):
        moved = latents + self.delta if t == self.at else latents
        return moved, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool)


def _after_step(scheduler_factory, perturbed_step: int, delta: torch.Tensor, guided: bool) -> torch.Tensor:
    scheduler = scheduler_factory()
    scheduler.set_timesteps(STEPS)
    scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps
    denoiser = _FixedVelocity(delta, timesteps[perturbed_step])
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    seen = {}
    if guided:
        denoise(
            denoiser,
            scheduler,
            start,
            timesteps,
            object(),
            None,
            GuidanceConfig(guide_steps=GUIDED),
            on_step=lambda i, t, x: seen.setdefault(i, x.clone()),
        )
        return seen[perturbed_step]
    latents = start  # the loop without guided_solver: diffusers' schedulers as they are
    for i, t in enumerate(timesteps[: perturbed_step + 1]):
        latents = denoiser.graph(latents, t)[0]
        latents = scheduler.step(denoiser.predict(latents, t, i, 0.0, STEPS), t, latents, return_dict=False)[0]
    return latents


def _survival(scheduler_factory, step: int, guided: bool = True) -> float:
    """The share of a latent perturbation made before `step` that is still in the latent after it."""
    delta = 0.01 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    moved = _after_step(scheduler_factory, step, delta, guided)
    moved = moved - _after_step(scheduler_factory, step, 0 * delta, guided)
    return float((moved * delta).sum() / delta.square().sum())


@pytest.mark.parametrize("name", list(_schedulers()))
@pytest.mark.parametrize("step", range(GUIDED))
def test_guided_updates_survive_the_solver(name, step):
    assert _survival(_schedulers()[name], step) >= 0.95


def test_unipc_corrector_discards_updates_without_guided_solver():
    """Why guided_solver exists: UniPC's corrector rebuilds the sample from the previous step's."""
    unipc = _schedulers()["unipc"]
    assert _survival(unipc, 0, guided=False) >= 0.95  # step 0 has no corrector
    assert all(abs(_survival(unipc, step, guided=False)) < 0.1 for step in (1, 2))


def test_guided_solver_restores_the_scheduler():
    scheduler = UniPCMultistepScheduler(disable_corrector=[5])
    with guided_solver(scheduler, 3):
        assert scheduler.disable_corrector == [0, 1, 5]
    assert scheduler.disable_corrector == [5]
    with guided_solver(scheduler, 1):  # only step 0 is guided: no corrector stands in its way
        assert scheduler.disable_corrector == [5]


@dataclass
class _LinearScore:
    """`Denoiser.score` for the objective loss = <a, x> + c per item (its gradient is `a`)."""

    a: torch.Tensor
    c: torch.Tensor

    def score(self, latents, t, objective, bound, config, gradient, inputs):
        loss = (self.a * latents).flatten(1).sum(1) + self.c
        return loss, torch.zeros(1), self.a.expand_as(latents).clone()


def _loss(score: _LinearScore, latents: torch.Tensor) -> torch.Tensor:
    return (score.a * latents).flatten(1).sum(1) + score.c


def test_polyak_step_reaches_the_target_and_no_further():
    torch.manual_seed(0)
    score = _LinearScore(torch.randn(3, 4, 2, 2, 2, dtype=torch.float64), torch.tensor([5.0, 0.2, 9.0]))
    latents = torch.zeros(3, 4, 2, 2, 2, dtype=torch.float64)
    config = GuidanceConfig(normalize="polyak", target_loss=1.0, strength=10.0)
    moved, loss, _, skipped = latent_update(score, latents, torch.tensor(999.0), None, None, config)
    after = _loss(score, moved)
    assert not skipped.any()
    torch.testing.assert_close(after[[0, 2]], torch.tensor([1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(moved[1], latents[1])  # already below the target: left where it is

    capped = GuidanceConfig(normalize="polyak", target_loss=1.0, strength=1e-3)
    moved = latent_update(score, latents, torch.tensor(999.0), None, None, capped)[0]
    rms = moved.flatten(1).square().mean(1).sqrt()
    torch.testing.assert_close(rms[[0, 2]], torch.tensor([1e-3, 1e-3], dtype=torch.float64), rtol=1e-12, atol=0)


def test_rms_step_stops_at_the_target_loss():
    score = _LinearScore(torch.ones(2, 4, 2, 2, 2, dtype=torch.float64), torch.tensor([3.0, -1.0]))
    latents = torch.zeros(2, 4, 2, 2, 2, dtype=torch.float64)
    config = GuidanceConfig(strength=0.1, target_loss=0.0, normalize="rms")
    moved = latent_update(score, latents, torch.tensor(999.0), None, None, config)[0]
    torch.testing.assert_close(moved[0], torch.full_like(moved[0], -0.1), rtol=0, atol=1e-15)
    assert torch.equal(moved[1], latents[1])


@dataclass
class _KnownClip:
    """A denoiser that knows the clean latent `x0` and the noise `e` it was drawn with: its flow prediction
    at any latent is `e - x0`, the exact velocity."""

    x0: torch.Tensor
    e: torch.Tensor

    def predict(self, latents, t, step, sigma, total):
        return self.e - self.x0


def test_self_recurrence_steps_down_and_renoises_to_the_same_level():
    """recurred(x at sigma_i) = (1 - sigma_i) x0 + noise of std sigma_i: the same marginal as x itself, its
    clean part kept, its noise partly fresh (Universal Guidance's x_t = sqrt(a_t / a_t-1) x_t-1 + ... on the
    flow); deterministic, and the same for an item whatever it is batched with."""
    from cvg.guidance.sampler import recurred

    shape = (1, 4, 8, 32, 32)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    e = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = torch.tensor([0.9, 0.8, 0.0], dtype=torch.float64)
    latents = (1 - sigmas[0]) * x0 + sigmas[0] * e
    again = recurred(_KnownClip(x0, e), latents, torch.tensor(900.0), 0, sigmas, 3)
    noise = again - (1 - sigmas[0]) * x0
    assert abs(noise.std().item() - 0.9) < 0.01  # its noise level: sigma_i again
    share = ((noise * e).mean() / (e * e).mean()).item()  # what is left of the old noise: scale x sigma_i+1
    assert abs(share - (0.1 / 0.2) * 0.8) < 0.01
    assert torch.equal(again, recurred(_KnownClip(x0, e), latents, torch.tensor(900.0), 0, sigmas, 3))
    pair = recurred(
        _KnownClip(x0.repeat(2, 1, 1, 1, 1), e.repeat(2, 1, 1, 1, 1)),
        latents.repeat(2, 1, 1, 1, 1),
        torch.tensor(900.0),
        0,
        sigmas,
        3,
    )
    assert torch.equal(pair[1:], again)


def test_recurrence_repeats_each_guided_steps_updates(tiny_pipe):
    size = dict(height=32, width=32, num_frames=5, num_inference_steps=4, max_sequence_length=64, output_type="latent")
    runs = {}
    for recurrence in (1, 3):
        pipe = CVGPipeline(tiny_pipe, guidance=GuidanceConfig(guide_steps=2, pool=(1, 1, 1), recurrence=recurrence))
        runs[recurrence] = pipe(
            "a red cube to the left of a blue ball",
            "red cube left of blue ball",
            generator=torch.Generator().manual_seed(0),
            **size,
        )
    assert len(runs[1].objective_values) == 2 and len(runs[3].objective_values) == 6  # 2 guided steps x 3 rounds
    assert not torch.allclose(runs[1].frames, runs[3].frames)
    with pytest.raises(ValueError, match="recurrence must be between 1 and 16"):
        GuidanceConfig(recurrence=17).check(4)


def test_maps_read_at_the_renoised_estimate_are_those_of_that_latent(tiny_pipe):
    """read_sigma: the maps are the ones recorded at (1 - s) x0_hat + s e, x0_hat = x - sigma v from a full
    forward at the latent; the gradient reaches the latent through both forwards; other families refuse it."""
    from cvg.guidance.sampler import Denoiser

    pipe = CVGPipeline(tiny_pipe)
    prompt, composition = "a red cube to the left of a blue ball", "red cube left of blue ball"
    bound = pipe.bind(prompt, composition, 64)
    embeds = tiny_pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=64)[0]
    denoiser = Denoiser(tiny_pipe.transformer, embeds, None, 1.0)
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    t, config = torch.tensor(800.0), GuidanceConfig(pool=(1, 1, 1))
    read = denoiser.read_maps(latents, t, bound, replace(config, read_sigma=0.5))
    with torch.no_grad():
        velocity = tiny_pipe.transformer(latents, t.expand(1), embeds, return_dict=False)[0]
    noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(0))
    estimate = 0.5 * (latents - 0.8 * velocity) + 0.5 * noise
    expected = denoiser.read_maps(estimate, torch.tensor(500.0), bound, config)
    torch.testing.assert_close(read, expected, rtol=1e-5, atol=1e-7)
    loss, _, grad = denoiser.score(latents, t, TokenPresence(), bound, replace(config, read_sigma=0.5), gradient=True)
    assert torch.isfinite(loss).all() and grad.abs().sum() > 0
