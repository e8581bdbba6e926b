"""The denoiser interface: Tweedie conversions and the VP adapter's three parameterisations."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal

from lightning_diff.diffusion import DiscreteSchedule, GaussianDenoiser, VPDenoiser


def test_gaussian_score_matches_autograd_of_the_noisy_density():
    mean, cov = (
        torch.tensor([0.3, -1.0, 2.0]),
        torch.tensor([[1.0, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 0.3]]),
    )
    den = GaussianDenoiser(mean, cov)
    sigma = 0.7
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    logp = MultivariateNormal(
        mean.double(), cov.double() + sigma**2 * torch.eye(3, dtype=torch.float64)
    ).log_prob(x)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(den.score(x.detach(), sigma), grad)


def test_gaussian_from_data_recovers_moments():
    data = torch.randn(5000, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 + 1
    den = GaussianDenoiser.from_data(data)
    torch.testing.assert_close(den.mean, torch.full((4,), 1.0, dtype=torch.float64), atol=0.1, rtol=0)
    torch.testing.assert_close(den.eigvals, torch.full((4,), 4.0, dtype=torch.float64), atol=0.4, rtol=0)
    x = torch.randn(3, 1, 2, 2)
    assert den(x, torch.full((3,), 0.5)).shape == x.shape


class Oracle(torch.nn.Module):
    """Outputs the exact eps / x0 / v for a known x0 and noise, whatever it is asked."""

    def __init__(self, x0, noise, sigma, prediction):
        super().__init__()
        ab = 1 / (1 + sigma**2)
        self.out = {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[prediction]

    def forward(self, z, t):
        return self.out


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vp_adapter_recovers_x0_from_each_parameterisation(prediction):
    schedule = DiscreteSchedule()
    x0, noise = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    sigma = schedule.sigmas[300]
    den = VPDenoiser(Oracle(x0, noise, sigma, prediction), schedule, prediction)
    x = x0 + sigma * noise
    torch.testing.assert_close(den(x, sigma.expand(8)), x0)
    torch.testing.assert_close(den.eps(x, sigma), noise)


def test_clamped_denoiser_limits_the_estimate_and_keeps_eps_consistent():
    from lightning_diff.diffusion.denoisers import ClampedDenoiser

    den = ClampedDenoiser(GaussianDenoiser(torch.zeros(2), 25 * torch.eye(2)))
    x = torch.tensor([[10.0, -0.5]])
    out = den(x, torch.tensor([0.1]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -0.5]]), atol=1e-3, rtol=0)
    torch.testing.assert_close(den.eps(x, 0.1), (x - out) / 0.1)
