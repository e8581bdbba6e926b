"""Kernel score model with learned local precisions (lightning_diff.diffusion.kernel_score)."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_fitting import fit_precisions

from lightning_diff.diffusion.closed_form import EmpiricalDenoiser
from lightning_diff.diffusion.kernel_bandwidth import isotropic_objective, isotropic_optimum
from lightning_diff.diffusion.kernel_score import KernelScore, loo_objective, scott_bandwidth
from lightning_diff.errors import ConfigError
from lightning_diff.models.kernel_wpo import KernelWPO
from lightning_diff.nets.precision import PrecisionField

PRECS = ["isotropic", "diagonal", "lowrank", "tangent"]  # tangent: low-rank covariance factors


def _make(y: torch.Tensor, prec: str, **kw) -> KernelScore:
    if prec == "tangent":
        return KernelScore(y, "lowrank", covariance_factors=True, **kw)
    return KernelScore(y, prec, **kw)


def _kernel(prec: str, n: int = 6, d: int = 3, **kw) -> KernelScore:
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = _make(y, prec, rank=2, bandwidth=0.7, init_scale=0.5, **kw)
    with torch.no_grad():  # make the precisions differ from point to point
        k.log_prec.add_(0.3 * torch.randn(k.log_prec.shape, generator=gen, dtype=torch.float64))
    return k


def _reference_log_density(k: KernelScore, x: torch.Tensor, sigma: float) -> torch.Tensor:
    cov = k.covariances().detach() + sigma**2 * torch.eye(k.dim, dtype=torch.float64)
    comp = torch.distributions.MultivariateNormal(k.points, covariance_matrix=cov)
    return torch.logsumexp(comp.log_prob(x[:, None]), 1) - math.log(k.num_points)


@pytest.mark.parametrize("prec", PRECS)
@pytest.mark.parametrize("sigma", [0.0, 0.4])
def test_score_is_gradient_of_log_mixture(prec, sigma):
    k = _kernel(prec)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ref = _reference_log_density(k, x, sigma)
    (grad,) = torch.autograd.grad(ref.sum(), x)
    with torch.no_grad():
        torch.testing.assert_close(k.log_density(x, sigma), ref)
        torch.testing.assert_close(k.score(x, sigma), grad)
        torch.testing.assert_close(k(x, torch.tensor(sigma)), x + sigma**2 * grad)


def test_per_sample_sigmas_match_scalar_calls():
    k = _kernel("lowrank")
    x = torch.randn(4, 3, dtype=torch.float64)
    sig = torch.tensor([0.1, 0.5, 0.1, 2.0], dtype=torch.float64)
    with torch.no_grad():
        out = k(x, sig)
        ref = torch.stack([k(x[i : i + 1], sig[i])[0] for i in range(4)])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("prec", PRECS)
def test_divergence_matches_autograd_trace(prec):
    k = _kernel(prec)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    s, div = k.score_and_divergence(x, 0.3)
    trace = sum(torch.autograd.grad(s[:, j].sum(), x, retain_graph=True)[0][:, j] for j in range(3))
    torch.testing.assert_close(div, trace)


@pytest.mark.parametrize("prec", PRECS)
def test_chunked_equals_unchunked_and_top_k_all_is_exact(prec):
    full = _kernel(prec, n=11)
    chunked = _kernel(prec, n=11, chunk_size=3)
    near = _kernel(prec, n=11, chunk_size=4, top_k=11)
    x = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        ref = full.score(x, 0.2)
        torch.testing.assert_close(chunked.score(x, 0.2), ref)
        torch.testing.assert_close(near.score(x, 0.2), ref)
        s1, d1 = full.score_and_divergence(x, 0.2, exclude=torch.arange(7))
        s2, d2 = chunked.score_and_divergence(x, 0.2, exclude=torch.arange(7))
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(d1, d2)


def test_top_k_is_close_far_from_ties():
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    exact = KernelScore(y, bandwidth=0.05)
    near = KernelScore(y, bandwidth=0.05, top_k=20, chunk_size=64)
    x = y[:10] + 0.01 * torch.randn(10, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(near.score(x, 0.05), exact.score(x, 0.05), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prec", PRECS)
def test_sharp_precisions_recover_empirical_denoiser(prec):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    k = _make(y, prec, rank=2, bandwidth=1e-4, init_scale=1.0)
    emp = EmpiricalDenoiser(y, chunk_size=3)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    for sigma in (0.3, 1.0):
        with torch.no_grad():
            torch.testing.assert_close(
                k(x, torch.tensor(sigma)), emp(x, torch.tensor(sigma)), atol=1e-5, rtol=0
            )


def test_lowrank_precision_matrix_inverse_is_consistent():
    k = _kernel("lowrank")
    with torch.no_grad():
        eye = torch.eye(3, dtype=torch.float64).expand(6, 3, 3)
        torch.testing.assert_close(k.precision_matrices() @ k.covariances(), eye)


def test_fit_lowers_loo_objective_and_finds_a_sensible_bandwidth():
    # 150 draws of N(0, diag(1, 0.25)); start from a bandwidth 3x too wide.
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(150, 2, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.0, 0.5], dtype=torch.float64
    )
    k = KernelScore(y, "isotropic", bandwidth=1.0, tied=True)
    with torch.no_grad():
        before = loo_objective(k).item()
    fit_precisions(k, steps=80, lr=0.05)
    with torch.no_grad():
        after = loo_objective(k).item()
    assert after < before
    var = 1 / k.log_prec.exp().item()
    # Leave-one-out score matching is a cross-validated bandwidth selector; for Gaussian data it lands
    # near the normal-reference (Scott / Silverman) rule, which is optimal for that case up to a
    # constant of order one. A factor 2 either way is a loose but meaningful band; the data variance
    # (0.625 per coordinate) is far outside it.
    ref = scott_bandwidth(y) ** 2
    assert ref / 2 < var < 2 * ref


def test_fit_without_loo_collapses_onto_training_points():
    # The self-centre degeneracy: when each point sees its own kernel, sharpening it always helps.
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    k = KernelScore(y, "isotropic", bandwidth=0.5, tied=True)
    hist = fit_precisions(k, steps=40, lr=0.1, loo=False)
    assert hist[-1] < hist[0]
    assert 1 / k.log_prec.exp().item() < 0.25 * 0.5**2


def test_bad_precision_name_raises():
    with pytest.raises(ValueError):
        KernelScore(torch.randn(4, 2), "full")


def test_isotropic_optimum_is_the_minimum_of_a_dense_grid():
    # The 1-D search (coarse grid + golden section) against brute force over 400 widths.
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(120, 3, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.0, 0.5, 0.2], dtype=torch.float64
    )
    h, value = isotropic_optimum(y, y, sigma=0.01)
    widths = torch.logspace(-2.5, 0.5, 400, dtype=torch.float64).tolist()
    values = [isotropic_objective(y, y, w, 0.01) for w in widths]
    best = min(range(400), key=values.__getitem__)
    assert widths[best - 1] <= h <= widths[best + 1]
    assert value <= values[best] + 1e-9
    assert value == pytest.approx(isotropic_objective(y, y, h, 0.01))


def test_kernel_model_starts_at_the_isotropic_optimum():
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(200, 2, generator=gen) * torch.tensor([1.0, 0.3])
    model = KernelWPO(PrecisionField((2,), form="full"))  # bandwidth=loo, the default
    model.fit_data(train)
    h, value = isotropic_optimum(train.double(), train.double(), sigma=model.fit_sigma)
    assert model.initial_bandwidth.item() == pytest.approx(h)
    assert model.initial_objective.item() == pytest.approx(value)
    with torch.no_grad():  # the precision field starts there: P = I / h^2 at every centre
        prec = model.net.precision_matrices(model.centers.float())
    torch.testing.assert_close(prec, torch.eye(2).expand_as(prec) / h**2, rtol=1e-3, atol=1e-3)
    assert model.loss(train).mean().item() == pytest.approx(value, rel=1e-3)  # the same objective
    scott = KernelWPO(PrecisionField((2,), form="full"), bandwidth="scott")
    scott.fit_data(train)
    assert scott.initial_objective.item() > value  # Scott's width is not the optimum here
    with pytest.raises(ConfigError, match="model.bandwidth"):
        KernelWPO(PrecisionField((2,)), bandwidth="silverman")
