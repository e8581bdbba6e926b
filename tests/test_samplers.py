"""Every sampler, driven by the closed-form Gaussian denoiser, reproduces the target distribution.

Target: N(mu, Sigma) in 2-D with correlation, 20000 samples. The Monte Carlo standard error of a
mean entry is about 0.01 and of a covariance entry about 0.01; discretisation adds a bias that
shrinks with the number of steps (DDIM at eta = 0 is Euler's method on the probability-flow ODE:
its covariance error measured 0.062, 0.028, 0.010 at 50, 100, 200 steps on the linear schedule).
With enough steps the tolerances (0.04 on mean and covariance entries) sit above both; a sampler
that ignored the denoiser or mixed up the variance would be off by far more (see
test_a_wrong_denoiser_fails_the_same_check).
"""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_diff.diffusion import (
    DiscreteSchedule,
    GaussianDenoiser,
    SampleGenerators,
    Sampler,
    sample_ancestral,
    sample_ddim,
)

MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
N = 20000

CASES = {
    "ddim_eta0_200": (functools.partial(sample_ddim, eta=0.0), 200),
    "ddim_eta1_1000": (functools.partial(sample_ddim, eta=1.0), 1000),
    "ancestral_posterior_1000": (functools.partial(sample_ancestral, variance="posterior"), 1000),
    "ancestral_beta_1000": (functools.partial(sample_ancestral, variance="beta"), 1000),
}


def draw(fn, num_steps, denoiser, kind="linear", spacing="leading"):
    sampler = Sampler(fn, num_steps=num_steps, spacing=spacing)
    x, nfe = sampler(denoiser, DiscreteSchedule(kind), (N, 2), torch.Generator().manual_seed(0))
    assert nfe == num_steps
    return x.double()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_reproduces_gaussian(case, kind):
    fn, steps = CASES[case]
    x = draw(fn, steps, GaussianDenoiser(MEAN, COV), kind)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.mean(0), MEAN.double(), atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV.double(), atol=0.04, rtol=0)


def test_a_wrong_denoiser_fails_the_same_check():
    """The check above has teeth: a denoiser for the wrong covariance misses it."""
    fn, steps = CASES["ddim_eta0_200"]
    x = draw(fn, steps, GaussianDenoiser(MEAN, 2 * COV))
    assert (torch.cov(x.T) - COV.double()).abs().max() > 0.3


def test_ddim_error_shrinks_with_steps():
    """Euler's method on the ODE: the covariance error falls as the step count grows."""
    errors = []
    for steps in (25, 50, 200):
        x = draw(functools.partial(sample_ddim, eta=0.0), steps, GaussianDenoiser(MEAN, COV))
        errors.append((torch.cov(x.T) - COV.double()).abs().max().item())
    assert errors[0] > errors[1] > errors[2]


def test_low_rank_gaussian_lands_on_its_subspace():
    """Rank-1 covariance (fewer samples than dimensions): samples stay on the line through the mean."""
    direction = torch.tensor([0.6, 0.8])
    cov = 2.0 * torch.outer(direction, direction)
    x = draw(functools.partial(sample_ddim, eta=0.0), 100, GaussianDenoiser(MEAN, cov))
    off = (x - MEAN.double()) @ torch.tensor([-0.8, 0.6], dtype=torch.float64)
    assert off.abs().max() < 1e-3
    along = (x - MEAN.double()) @ direction.double()
    assert abs(along.var().item() - 2.0) < 0.1


def test_ancestral_posterior_equals_ddim_eta_one():
    """Posterior-variance ancestral sampling is DDIM with eta = 1, step for step."""
    schedule, den = DiscreteSchedule(), GaussianDenoiser(MEAN, COV)
    sigmas = schedule.sampling_sigmas(25)
    x0 = torch.randn(100, 2, generator=torch.Generator().manual_seed(1)) * float(
        schedule.prior_std(sigmas[0])
    )
    a, _ = sample_ancestral(den, x0, sigmas, torch.Generator().manual_seed(2))
    b, _ = sample_ddim(den, x0, sigmas, torch.Generator().manual_seed(2), eta=1.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_per_sample_seeds_do_not_depend_on_batching():
    schedule, den = DiscreteSchedule(), GaussianDenoiser(MEAN, COV)
    sampler = Sampler(functools.partial(sample_ddim, eta=1.0), num_steps=10)
    whole, _ = sampler(den, schedule, (10, 2), SampleGenerators(range(10), seed=7))
    parts = [
        sampler(den, schedule, (len(r), 2), SampleGenerators(r, seed=7))[0]
        for r in (range(0, 3), range(3, 10))
    ]
    torch.testing.assert_close(torch.cat(parts), whole)
    other, _ = sampler(den, schedule, (10, 2), SampleGenerators(range(10), seed=8))
    assert not torch.allclose(other, whole)


def test_callback_sees_every_step():
    seen = []
    sampler = Sampler(sample_ddim, num_steps=7)
    sampler(
        GaussianDenoiser(MEAN, COV), DiscreteSchedule(), (4, 2), None, callback=lambda d: seen.append(d["i"])
    )
    assert seen == list(range(7))


def test_every_family_schedule_is_a_sampler_schedule():
    from lightning_diff.diffusion.samplers import Schedule
    from lightning_diff.diffusion.sdes import VESDE, VPSDE, SubVPSDE

    for schedule in (DiscreteSchedule("linear"), DiscreteSchedule("cosine"), VPSDE(), SubVPSDE(), VESDE()):
        assert isinstance(schedule, Schedule), type(schedule).__name__
        sigmas = schedule.sampling_sigmas(8, "karras")
        assert sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())
        assert float(schedule.prior_std(sigmas[0])) >= float(sigmas[0]) * 0.99
    assert not isinstance(object(), Schedule)
