"""``sampler=exact``: draws of a closed-form mixture (kernel WPO, Gaussian, mixture, empirical).

The answers are the mixtures' own moments, computed from the component covariances by matrix
inversion (not by the sampler's factored draws), and the probability-flow ODE of the same model.
"""

from __future__ import annotations

import pytest
import torch

from lightning_diff.diffusion.closed_form import EmpiricalDenoiser, GaussianMixtureDenoiser
from lightning_diff.diffusion.denoisers import ClampedDenoiser, GaussianDenoiser
from lightning_diff.diffusion.exact import ExactSampler
from lightning_diff.diffusion.kernel_score import KernelScore
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.diffusion.samplers import Sampler, sample_ddim
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.errors import ConfigError
from lightning_diff.models.kernel_wpo import KernelWPO
from lightning_diff.nets.precision import FORMS, PrecisionField

N = 40_000


def _mixture_moments(means, covs, weights):
    weights = weights / weights.sum()
    mean = (weights[:, None] * means).sum(0)
    second = (weights[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean)


def _assert_moments(samples, mean, cov):
    # Monte Carlo error of N draws: about sqrt(var / N) for the mean, sqrt(2 var^2 / N) for the covariance.
    scale = cov.diagonal().max().sqrt()
    assert (samples.mean(0) - mean).abs().max() < 5 * scale / N**0.5
    torch.testing.assert_close(torch.cov(samples.T), cov, rtol=0, atol=float(8 * scale**2 / N**0.5))


@pytest.mark.parametrize("form", FORMS)
def test_kernel_model_draws_have_the_mixture_moments(form):
    torch.manual_seed(0)
    field = PrecisionField((3,), form=form, rank=2, floor=0.2).double()
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))
    centres = torch.randn(6, 3, dtype=torch.float64) * 2
    model = KernelWPO(field)
    model.centers = centres
    kernel = model.kernel(field)
    covs = torch.linalg.inv(field.precision_matrices(centres)).detach()  # from the precisions
    samples = kernel.sample_exact((N, 3), torch.Generator().manual_seed(1))
    _assert_moments(samples, *_mixture_moments(centres, covs, torch.ones(6, dtype=torch.float64)))


def test_analytic_models_draw_their_own_distribution():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [4.0, 1.0], [-2.0, 3.0]], dtype=torch.float64)
    a = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64)
    covs = a @ a.mT + 0.1 * torch.eye(2, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    gmm = GaussianMixtureDenoiser(means, covs, weights)
    _assert_moments(gmm.sample_exact((N, 2), gen), *_mixture_moments(means, covs, weights))
    gauss = GaussianDenoiser(means[1], covs[1])
    _assert_moments(gauss.sample_exact((N, 2), gen), means[1], covs[1])
    points = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    copies = EmpiricalDenoiser(points).sample_exact((3000, 2), gen)
    # Every draw is one of the training points, bit for bit (cdist's matmul form is off by ~1e-8).
    equal = (copies[:, None, :] == points[None, :, :]).all(-1)
    assert equal.any(1).all()
    counts = equal.float().argmax(1).bincount(minlength=7)
    assert counts.min() > 3000 / 7 * 0.8  # and each is drawn about equally often


def test_exact_draws_do_not_depend_on_the_batch_layout():
    kernel = KernelScore(torch.randn(10, 4), "lowrank", rank=2, bandwidth=0.5, init_scale=0.5)
    whole = kernel.sample_exact((12, 4), SampleGenerators(range(12), seed=3))
    parts = [
        kernel.sample_exact((n, 4), SampleGenerators(r, seed=3))
        for n, r in ((5, range(5)), (7, range(5, 12)))
    ]
    torch.testing.assert_close(torch.cat(parts), whole)


def test_exact_sampler_matches_the_flow_of_a_fitted_kernel_model():
    # The same model sampled two ways: its mixture drawn directly, and its probability-flow ODE
    # (DDIM, 60 steps). Both target one distribution; only the ODE has discretisation error.
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(300, 2, generator=gen) * torch.tensor([1.0, 0.3]) + torch.tensor([0.5, -1.0])
    model = KernelWPO(PrecisionField((2,), form="full", seed=0), bandwidth=0.3)
    model.fit_data(train)
    exact, nfe = model.sample(6000, (2,), ExactSampler(), SampleGenerators(range(6000), 1), use_ema=False)
    assert nfe == 0
    flow, _ = model.sample(
        6000, (2,), Sampler(sample_ddim, 60), SampleGenerators(range(6000), 2), use_ema=False
    )
    var = torch.cov(exact.T).diagonal()
    assert ((exact.mean(0) - flow.mean(0)).abs() < 4 * (2 * var / 6000).sqrt()).all()  # 4 standard errors
    torch.testing.assert_close(
        torch.cov(exact.T), torch.cov(flow.T), rtol=0, atol=4 * (4 / 6000) ** 0.5 * var.max().item()
    )
    # and both have the data's moments, widened by the kernels' own covariance (h^2 = 0.09)
    widened = torch.cov(train.T) + 0.09 * torch.eye(2)
    torch.testing.assert_close(torch.cov(exact.T), widened, rtol=0, atol=0.05)


def test_exact_sampler_clamps_like_the_others_and_refuses_a_neural_model():
    points = torch.tensor([[0.9, -0.9], [-0.9, 0.9]])
    clamped = ClampedDenoiser(KernelScore(points, bandwidth=0.5))
    x, _ = ExactSampler()(clamped, DiscreteSchedule(), (500, 2), torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1 and (x.abs() == 1).any()  # wide kernels spill over the range: clamped
    with pytest.raises(ConfigError, match="sampler=exact needs"):
        ExactSampler()(ClampedDenoiser(torch.nn.Identity()), DiscreteSchedule(), (4, 2))
