"""Flow-matching inversion: the Euler grid is right, and inverting then regenerating returns the latent."""

import pytest
import torch

from cvg.guidance.inversion import descend, invert, regenerate
from cvg.guidance.sampler import Denoiser


class _Field:
    """A stand-in denoiser with a known velocity field v(x, sigma) = a x + b sigma."""

    def __init__(self, a: float, b: float):
        self.a, self.b, self.calls = a, b, []

    def predict(self, latents, t, step, sigma, total):
        self.calls.append(float(t))
        return self.a * latents + self.b * sigma


def test_a_constant_field_is_integrated_exactly():
    x0 = torch.randn(1, 4, 2, 4, 4, dtype=torch.float64)
    field = _Field(0.0, 0.0)
    field.predict = lambda latents, t, step, sigma, total: torch.full_like(latents, 2.0)
    low, high = invert(field, x0, [0.25, 1.0], substeps=3)
    torch.testing.assert_close(low, x0 + 0.5)
    torch.testing.assert_close(high, x0 + 2.0)


def test_the_model_sees_wan_timesteps_along_the_grid():
    field = _Field(0.1, 1.0)
    invert(field, torch.zeros(1, 1, 1, 1, 1), [0.5, 1.0], substeps=2)
    assert field.calls == pytest.approx([0.0, 250.0, 500.0, 750.0])


def test_euler_error_shrinks_with_the_step_count():
    """For dx/ds = a x (exact: x0 exp(a s)), the error halves as the steps double (first order)."""
    x0 = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    exact = torch.exp(torch.tensor(0.8, dtype=torch.float64))
    errors = [(invert(_Field(0.8, 0.0), x0, [1.0], substeps=n)[0] - exact).abs().item() for n in (8, 16, 32)]
    assert errors[1] < 0.55 * errors[0] and errors[2] < 0.55 * errors[1]


def test_invert_then_regenerate_returns_the_latent_on_a_wan_transformer(tiny_pipe):
    embeds, _ = tiny_pipe.encode_prompt("a red cube", do_classifier_free_guidance=False, max_sequence_length=64)
    denoiser = Denoiser(tiny_pipe.transformer, embeds, None, 1.0)
    x0 = torch.randn(1, tiny_pipe.transformer.config.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = []
    for substeps in (2, 8):
        (noisy,) = invert(denoiser, x0, [0.5], substeps=substeps)
        errors.append((regenerate(denoiser, noisy, 0.5, substeps=substeps) - x0).abs().max().item())
    assert errors[1] < errors[0] / 2 and errors[1] < 0.05 * x0.abs().max().item()


@pytest.mark.parametrize(("sigmas", "substeps"), [([], 4), ([0.5, 0.2], 4), ([0.0, 0.5], 4), ([1.5], 4), ([0.5], 0)])
def test_bad_grids_are_refused(sigmas, substeps):
    with pytest.raises(ValueError, match="sigmas must be|substeps must be"):
        invert(_Field(0.0, 0.0), torch.zeros(1), sigmas, substeps)


def test_descend_replays_from_noise_down_the_grid_and_mirrors_invert():
    field = _Field(0.0, 0.0)
    field.predict = lambda latents, t, step, sigma, total: torch.full_like(latents, 2.0)
    noise = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)
    top, mid, low = descend(field, noise, [1.0, 0.75, 0.25], substeps=3)
    assert top is noise  # sigma 1 is the noise itself
    torch.testing.assert_close(mid, noise - 0.5)
    torch.testing.assert_close(low, noise - 1.5)
    x0 = torch.randn(1, 1, 1, 2, 2, dtype=torch.float64)
    (up,) = invert(_Field(0.3, 0.0), x0, [1.0], substeps=64)
    (back,) = descend(_Field(0.3, 0.0), up, [1e-9], substeps=64)
    torch.testing.assert_close(back, x0, atol=0.02, rtol=0)  # first order: the error is O(1/substeps)
    for sigmas in ([0.25, 0.75], [1.5], []):
        with pytest.raises(ValueError, match="sigmas must be decreasing values in"):
            descend(field, noise, sigmas)
