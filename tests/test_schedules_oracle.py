"""Schedules and DDPM / DDIM steps against diffusers' schedulers, used here only as an oracle.

diffusers counts t = 0 .. T-1 like us. Its schedulers clip x0 to [-1, 1] by default; we compare
with clip_sample=False on its side (our samplers never clip). Its DDIM step always moves back by
T // num_steps, which agrees with our grid for 'leading' spacing only, so that is what we compare.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lightning_diff.diffusion import (
    DiscreteSchedule,
    GaussianDenoiser,
    VPDenoiser,
    sample_ancestral,
    sample_ddim,
)

DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


class ConstantEps(torch.nn.Module):
    """A 'network' that predicts a fixed eps whatever its input."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps

    def forward(self, z, t):
        return self.eps


class GaussianEps(torch.nn.Module):
    """The exact eps-prediction of Gaussian data at integer/fractional timestep t, in z-space."""

    def __init__(self, denoiser: GaussianDenoiser, schedule: DiscreteSchedule):
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule

    def forward(self, z, t):
        sigma = self.schedule.t_to_sigma(t)
        ab = (1 / (1 + sigma**2)).to(z.dtype)[:, None]
        x = z / ab.sqrt()
        x0 = self.denoiser(x, sigma.to(z.dtype))
        return (z - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alphas_cumprod_match_diffusers(kind):
    ours = DiscreteSchedule(kind)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[kind])
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers(spacing):
    ours = DiscreteSchedule().timesteps(50, spacing)
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    ref.set_timesteps(50)
    assert torch.equal(ours, ref.timesteps.long())


def test_sigma_t_roundtrip_is_exact_on_grid():
    s = DiscreteSchedule("cosine")
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.sigmas), t, atol=1e-9, rtol=0)
    mid = torch.tensor([10.5, 500.25])
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(mid)), mid.double(), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "variance,diffusers_variance", [("posterior", "fixed_small"), ("beta", "fixed_large")]
)
@pytest.mark.parametrize("t", [999, 500, 1, 0])
def test_ancestral_step_matches_diffusers(variance, diffusers_variance, t):
    schedule = DiscreteSchedule("linear")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 3, generator=gen)
    eps = torch.randn(16, 3, generator=gen)
    ref = DDPMScheduler(num_train_timesteps=1000, variance_type=diffusers_variance, clip_sample=False)
    ref.set_timesteps(1000)
    expected = ref.step(eps, t, z, generator=torch.Generator().manual_seed(1)).prev_sample

    sigma = schedule.sigmas[t]
    sigma_next = schedule.sigmas[t - 1] if t > 0 else torch.zeros((), dtype=torch.float64)
    x = z * (1 + sigma**2).sqrt().float()
    denoiser = VPDenoiser(ConstantEps(eps), schedule, "eps")
    out, nfe = sample_ancestral(
        denoiser, x, torch.stack([sigma, sigma_next]), torch.Generator().manual_seed(1), variance=variance
    )
    got = out / (1 + sigma_next**2).sqrt().float()
    assert nfe == 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_matches_diffusers(eta):
    """A full 20-step DDIM run driven by the exact Gaussian eps-model ends at the same samples."""
    schedule = DiscreteSchedule("linear")
    gaussian = GaussianDenoiser(torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.3], [0.3, 0.5]]))
    net = GaussianEps(gaussian, schedule)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    ref = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(20)
    sample, gen = z.clone(), torch.Generator().manual_seed(3)
    for t in ref.timesteps:
        eps = net(sample, t.expand(64).double())
        sample = ref.step(eps, t, sample, eta=eta, generator=gen).prev_sample

    sigmas = schedule.sampling_sigmas(20, "leading")
    x = z * (1 + sigmas[0] ** 2).sqrt().float()
    out, nfe = sample_ddim(VPDenoiser(net, schedule), x, sigmas, torch.Generator().manual_seed(3), eta=eta)
    assert nfe == 20
    torch.testing.assert_close(out, sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("prediction", "prediction_type"), [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")]
)
@pytest.mark.parametrize("t", [980, 500, 20])
def test_ddim_step_matches_diffusers_for_each_prediction_type(prediction, prediction_type, t):
    """One deterministic DDIM step from a network output read as eps, x0 or v, against diffusers'
    DDIMScheduler with the same prediction_type (leading spacing, 50 steps: t -> t - 20)."""
    schedule = DiscreteSchedule("linear")
    gen = torch.Generator().manual_seed(t)
    z = torch.randn(16, 2, generator=gen)
    output = torch.randn(16, 2, generator=gen)
    ref = DDIMScheduler(
        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True, prediction_type=prediction_type
    )
    ref.set_timesteps(50)
    expected = ref.step(output, t, z, eta=0.0).prev_sample

    sigmas = torch.stack([schedule.sigmas[t], schedule.sigmas[t - 20]])
    x = z * (1 + sigmas[0] ** 2).sqrt().float()
    out, _ = sample_ddim(VPDenoiser(ConstantEps(output), schedule, prediction), x, sigmas)
    torch.testing.assert_close(out / (1 + sigmas[1] ** 2).sqrt().float(), expected, rtol=1e-4, atol=1e-4)
