"""ld-tv: the exact output moments of every sampler, Gaussian TV and KL, the Girsanov bound's terms."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from lightning_diff.data.distributions import Gaussian, GaussianMixture
from lightning_diff.diffusion import VPSDE, Sampler
from lightning_diff.diffusion.closed_form import GaussianMixtureDenoiser
from lightning_diff.diffusion.denoisers import GaussianDenoiser
from lightning_diff.diffusion.propagate import gaussian_output
from lightning_diff.diffusion.sde_samplers import sample_exponential
from lightning_diff.diffusion.tv_bound import (
    PerturbedDenoiser,
    ScoreError,
    discretisation_kl,
    horizon_term,
    mc_discretisation_kl,
    mc_final_step_term,
    mc_horizon_term,
    ve_drift_gap,
    vp_score_gap,
)
from lightning_diff.metrics.gaussian_tv import gaussian_kl, gaussian_tv_1d, gaussian_tv_mc
from lightning_diff.tv_study import (
    Cell,
    draw_mixture,
    histogram_tv,
    mixture_cell_probabilities,
    noisy_mixture_log_prob,
    run_cell,
)

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
SAMPLERS = ("ancestral", "euler_maruyama", "exponential", "ddim", "heun")
TV_OPTIONS = {"num_samples": 200_000, "seed": 0, "bins": 40}


def sampler(name: str, steps: int) -> Sampler:
    from lightning_diff.cli.tv import load_sampler

    return load_sampler(name).with_num_steps(steps)


def _error(kind: str) -> ScoreError:
    return ScoreError.named(kind, MEAN, COV, seed=0)


@pytest.mark.parametrize("kind", ["constant", "linear"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_propagated_moments_equal_a_monte_carlo_run_of_the_same_sampler(name, kind):
    """With an injected error, on a short grid (where the output is far from the data)."""
    denoiser = PerturbedDenoiser(GaussianDenoiser(MEAN, COV), 0.2, _error(kind))
    schedule = VPSDE()
    run = sampler(name, 8)
    mean, cov, _ = gaussian_output(run, denoiser, schedule, 2)
    num = 100_000
    x, _ = run(denoiser, schedule, (num, 2), generator=torch.Generator().manual_seed(1))
    x = x.double()
    se_mean = (cov.diagonal() / num).sqrt()
    assert ((x.mean(0) - mean).abs() < 5 * se_mean).all()
    mc_cov = torch.cov(x.T)
    # The standard error of a covariance entry: sqrt((C_ii C_jj + C_ij^2) / n).
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / num).sqrt()
    assert ((mc_cov - cov).abs() < 5 * se_cov).all()
    assert not torch.allclose(cov, COV, atol=0.02)  # eight steps: visibly not the data


@pytest.mark.parametrize("kind", ["constant", "linear"])
def test_the_injected_error_has_unit_rms_under_the_noisy_data_at_every_level(kind):
    """``E|u_sigma(z)|^2 = dim`` for ``z`` from the VP marginal, by Monte Carlo: on a Gaussian and
    on a mixture (whose error is normalised through its mean and covariance only)."""
    gen = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(num_components=3, radius=2.0, std=0.4)
    m_mean, m_cov = mixture.mean, mixture.cov
    draws = {
        "gaussian": (MEAN, COV, torch.distributions.MultivariateNormal(MEAN, COV).sample((200_000,))),
        "mixture": (m_mean, m_cov, draw_mixture(mixture)(200_000, gen)),
    }
    for data_mean, data_cov, x0 in draws.values():
        error = ScoreError.named(kind, data_mean, data_cov, seed=1)
        for sigma in (0.05, 1.0, 30.0):
            ab = 1 / (1 + sigma**2)
            z = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(
                x0.shape, generator=gen, dtype=torch.float64
            )
            sq = (error(z, torch.full((len(z),), sigma, dtype=torch.float64)) ** 2).sum(1) / 2
            assert abs(float(sq.mean()) - 1.0) < 4 * float(sq.std()) / math.sqrt(len(sq)) + 1e-12


def test_mixture_moments_equal_monte_carlo():
    mixture = GaussianMixture(means=[[0.0, 1.0], [3.0, -1.0]], stds=[0.5, 1.2], weights=[0.3, 0.7])
    x = draw_mixture(mixture)(400_000, torch.Generator().manual_seed(0))
    mean, cov = mixture.mean, mixture.cov
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.03, rtol=0)


def test_a_linear_error_changes_the_output_covariance_a_constant_one_does_not():
    """At 500 steps the output with a constant error is the error-free covariance moved in its mean;
    a linear error of the same RMS widens it (its matrix is positive definite)."""
    schedule, run = VPSDE(), sampler("euler_maruyama", 500)
    outputs = {
        kind: gaussian_output(
            run, PerturbedDenoiser(GaussianDenoiser(MEAN, COV), 0.3, _error(kind)), schedule, 2
        )
        for kind in ("constant", "linear")
    }
    clean_mean, clean_cov, _ = gaussian_output(run, GaussianDenoiser(MEAN, COV), schedule, 2)
    const_mean, const_cov, _ = outputs["constant"]
    lin_mean, lin_cov, _ = outputs["linear"]
    torch.testing.assert_close(const_cov, clean_cov, atol=1e-10, rtol=0)
    assert (const_mean - clean_mean).abs().min() > 0.05
    assert torch.linalg.eigvalsh(lin_cov - clean_cov).min() > 0.05


def test_exponential_step_is_the_vp_exponential_integrator():
    """One step, re-derived in the VP coordinates z = x / sqrt(1 + sigma^2) with the VP score."""
    denoiser = GaussianDenoiser(MEAN, COV)
    sigma, sigma_next = 3.0, 0.7
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    class Fixed:
        def randn(self, shape, device=None, dtype=None):
            return noise

    out, _ = sample_exponential(denoiser, x, torch.tensor([sigma, sigma_next, 0.0]), generator=Fixed())
    # the loop ends with the denoiser at sigma_next; undo it by taking the state before that step
    ab, ab_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    z = x * math.sqrt(ab)
    marginal_cov = ab * COV + (1 - ab) * torch.eye(2, dtype=torch.float64)
    score_z = -torch.linalg.solve(marginal_cov, (z - math.sqrt(ab) * MEAN).T).T
    beta_integral = math.log(ab_next / ab)  # int beta dt over the step
    r = math.exp(beta_integral / 2)
    z_next = r * z + 2 * (r - 1) * score_z + math.sqrt(r**2 - 1) * noise
    expected = denoiser(z_next / math.sqrt(ab_next), torch.tensor(sigma_next, dtype=torch.float64))
    assert torch.allclose(out.double(), expected, atol=1e-10)


def test_tv_of_equal_gaussians_is_zero_and_known_1d_gaussians_match_quadrature():
    assert gaussian_tv_1d(0.3, 1.2, 0.3, 1.2) == pytest.approx(0.0, abs=1e-15)
    tv_mc, se = gaussian_tv_mc(MEAN, COV, MEAN, COV, 10_000)
    assert tv_mc == 0.0 and se == 0.0
    for m1, s1, m2, s2 in [(0.0, 1.0, 1.0, 1.0), (0.0, 1.0, 0.5, 2.0), (2.0, 0.3, -1.0, 1.5)]:
        half_l1, _ = integrate.quad(
            lambda t, m1=m1, s1=s1, m2=m2, s2=s2: abs(stats.norm.pdf(t, m1, s1) - stats.norm.pdf(t, m2, s2)),
            -40,
            40,
            points=[m1, m2],
            limit=400,
        )
        assert gaussian_tv_1d(m1, s1, m2, s2) == pytest.approx(0.5 * half_l1, abs=1e-8)
        mc, se = gaussian_tv_mc(
            torch.tensor([m1]), torch.tensor([[s1**2]]), torch.tensor([m2]), torch.tensor([[s2**2]]), 200_000
        )
        assert abs(mc - 0.5 * half_l1) < 5 * se


def test_gaussian_kl_matches_monte_carlo_and_pinsker_holds():
    other_mean, other_cov = MEAN + torch.tensor([0.4, 0.1], dtype=torch.float64), COV * 1.7
    kl = gaussian_kl(MEAN, COV, other_mean, other_cov)
    x = torch.distributions.MultivariateNormal(MEAN, COV).sample((400_000,))
    log_ratio = torch.distributions.MultivariateNormal(MEAN, COV).log_prob(
        x
    ) - torch.distributions.MultivariateNormal(other_mean, other_cov).log_prob(x)
    assert abs(kl - float(log_ratio.mean())) < 5 * float(log_ratio.std()) / math.sqrt(len(x))
    tv, _ = gaussian_tv_mc(MEAN, COV, other_mean, other_cov, 200_000)
    assert tv <= math.sqrt(kl / 2)


@pytest.mark.parametrize("lam", [0.05, 1.0, 4.0])
def test_expected_drift_gaps_equal_monte_carlo_on_the_forward_process(lam):
    """The Girsanov integrands, against the exact scores on pairs drawn from the forward process."""
    gen = torch.Generator().manual_seed(0)
    denoiser = GaussianDenoiser(torch.zeros(1), torch.tensor([[lam]]))
    tau, tau_k, num = 0.6, 1.5, 400_000
    x0 = math.sqrt(lam) * torch.randn(num, 1, generator=gen, dtype=torch.float64)
    x = x0 + math.sqrt(tau) * torch.randn(num, 1, generator=gen, dtype=torch.float64)
    x_k = x + math.sqrt(tau_k - tau) * torch.randn(num, 1, generator=gen, dtype=torch.float64)
    gap = denoiser.score(x, math.sqrt(tau)) - denoiser.score(x_k, math.sqrt(tau_k))
    ve = (gap**2).mean().item()
    assert ve == pytest.approx(float(ve_drift_gap(np.array(lam), np.array(tau), tau_k)), rel=0.02)
    # VP: z = x / sqrt(1 + tau), score_z = sqrt(1 + tau) score_x
    gap_vp = math.sqrt(1 + tau) * denoiser.score(x, math.sqrt(tau)) - math.sqrt(1 + tau_k) * denoiser.score(
        x_k, math.sqrt(tau_k)
    )
    vp = (gap_vp**2).mean().item()
    assert vp == pytest.approx(float(vp_score_gap(np.array(lam), np.array(tau), tau_k)), rel=0.02)


def test_discretisation_kl_shrinks_like_the_step_and_rejects_unbounded_schemes():
    schedule = VPSDE()
    lam = torch.tensor([0.5, 2.0], dtype=torch.float64)
    kl = {
        n: discretisation_kl(lam, schedule.sampling_sigmas(n, "uniform"), "euler_maruyama")
        for n in (100, 400)
    }
    assert 3.0 < kl[100] / kl[400] < 5.0  # KL ~ step size: four times the steps, a quarter
    with pytest.raises(ValueError, match="no Girsanov bound"):
        discretisation_kl(lam, schedule.sampling_sigmas(10, "uniform"), "ddim")


@pytest.mark.parametrize("name", ["ancestral", "euler_maruyama", "exponential"])
def test_exact_tv_falls_with_steps_at_zero_error_and_levels_off_with_an_error(name):
    dist = Gaussian(mean=[0.5], cov=[[0.8]])
    tv = {
        (n, e): run_cell(dist, sampler(name, n), Cell(name, n, e, 20.0), 0.1, 1e-3, TV_OPTIONS)["tv"]
        for n in (10, 50, 250)
        for e in (0.0, 0.1)
    }
    assert tv[(10, 0.0)] > tv[(50, 0.0)] > tv[(250, 0.0)]
    assert tv[(250, 0.0)] < 0.2 * tv[(10, 0.0)]
    # with an error, five times the steps no longer helps: TV stays at the error's level
    assert tv[(250, 0.1)] > 5 * tv[(250, 0.0)]
    assert abs(tv[(250, 0.1)] - tv[(50, 0.1)]) < 0.25 * tv[(250, 0.1)]


@pytest.mark.parametrize("kind", ["constant", "linear"])
@pytest.mark.parametrize("name", ["euler_maruyama", "exponential"])
def test_no_cell_exceeds_its_bound(name, kind):
    """Short and default horizons, coarse and fine grids, with and without an error (constant and
    linear in x), 1-D and 2-D."""
    for dist in (Gaussian(mean=[0.5], cov=[[0.8]]), Gaussian(dim=2, seed=3)):
        for steps in (5, 30, 200):
            for error in (0.0, 0.3, 1.0):
                for horizon in (1.0, 20.0):
                    cell = Cell(name, steps, error, horizon)
                    options = {**TV_OPTIONS, "num_samples": 50_000}
                    row = run_cell(dist, sampler(name, steps), cell, 0.1, 1e-3, options, kind)
                    assert row["bound"] is not None and row["within_bound"], row
                    assert row["tv"] <= row["bound"] and row["perturbation"] == kind


def test_ode_and_ancestral_cells_have_terms_but_no_bound():
    dist = Gaussian(mean=[0.5], cov=[[0.8]])
    for name in ("ancestral", "ddim", "heun"):
        row = run_cell(dist, sampler(name, 20), Cell(name, 20, 0.0, 20.0), 0.1, 1e-3, TV_OPTIONS)
        assert row["bound"] is None and row["within_bound"] is None
        assert row["horizon_term"] > 0 and row["tv_method"] == "exact"


def test_mixture_cells_against_exact_cell_probabilities():
    dist = GaussianMixture(num_components=4, radius=2.0, std=0.4)
    from lightning_diff.tv_study import _histogram_edges

    edges = _histogram_edges(dist, 30)
    probs = mixture_cell_probabilities(dist, edges)
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    draws = dist.sample(200_000, torch.Generator().manual_seed(0)).double().numpy()

    def freq(x):
        return np.histogramdd(x, bins=edges)[0] / len(x)

    floor = histogram_tv(freq(draws), probs)
    assert floor < 0.05
    # a shifted mixture is far, an exact draw is near
    assert histogram_tv(freq(draws + 0.5), probs) > 5 * floor
    options = {"num_samples": 20_000, "seed": 0, "bins": 20, "bound_samples": 512}
    row = run_cell(
        dist, sampler("euler_maruyama", 100), Cell("euler_maruyama", 100, 0.0, 20.0), 0.1, 1e-3, options
    )
    coarse = run_cell(
        dist, sampler("euler_maruyama", 5), Cell("euler_maruyama", 5, 0.0, 20.0), 0.1, 1e-3, options
    )
    assert row["tv"] < 2 * row["tv_floor"] < coarse["tv"]
    for r in (row, coarse):
        assert r["bound"] is not None and r["within_bound"], r
        assert r["bound_se"] < 0.05 * r["bound"]
    assert coarse["discretisation_term"] > 3 * row["discretisation_term"]


def _one_component(mean, variances):
    """A Gaussian with diagonal covariance as a one-component mixture, with its exact denoiser."""
    dist = GaussianMixture(means=[mean], covs=[np.diag(variances).tolist()])
    return dist, GaussianMixtureDenoiser(dist.means, dist.covs, dist.weights)


@pytest.mark.parametrize("scheme", ["euler_maruyama", "exponential"])
def test_monte_carlo_girsanov_kl_equals_the_closed_form_on_a_gaussian(scheme):
    dist, den = _one_component([0.5, -1.0], [0.3, 1.5])
    sigmas = VPSDE(beta_min=0.1, beta_max=20.0, eps=1e-3).sampling_sigmas(12)
    exact = discretisation_kl(torch.tensor([0.3, 1.5], dtype=torch.float64), sigmas, scheme)
    kl, se = mc_discretisation_kl(
        den, draw_mixture(dist), sigmas, scheme, 4000, torch.Generator().manual_seed(0)
    )
    assert se < 0.03 * exact
    assert abs(kl - exact) < 4 * se


def test_monte_carlo_horizon_term_equals_the_closed_form_on_a_gaussian():
    dist, _ = _one_component([0.5, -1.0], [0.3, 1.5])
    draws = draw_mixture(dist)(200_000, torch.Generator().manual_seed(0))
    value, se = mc_horizon_term(dist.log_prob, draws, 3.0)
    exact = horizon_term(dist.means[0], dist.covs[0], 3.0)
    assert se < 0.01 * exact
    assert abs(value - exact) < 4 * se


def test_final_step_tv_through_the_change_of_variables():
    """On a Gaussian the denoised output is N(m + shift, c^2 / (c + s^2)), TV exact in 1-D; on a
    bimodal 1-D mixture, against quadrature of |p_s(x) - p(D(x)) D'(x)| with D' by finite differences."""
    gen = torch.Generator().manual_seed(0)
    dist, den = _one_component([0.4], [0.5])
    s, shift = 0.3, torch.tensor([0.05], dtype=torch.float64)
    noisy = draw_mixture(dist)(200_000, gen)
    noisy = noisy + s * torch.randn(noisy.shape, generator=gen, dtype=torch.float64)
    tv, se = mc_final_step_term(den, dist.log_prob, noisy_mixture_log_prob(dist, s), noisy, s, shift)
    exact = gaussian_tv_1d(0.4, math.sqrt(0.5), 0.45, math.sqrt(0.25 / 0.59))  # c^2 / (c + s^2)
    assert abs(tv - exact) < 4 * se and se < 0.02 * exact

    dist = GaussianMixture(means=[[-1.0], [1.5]], stds=[0.3, 0.6], weights=[0.3, 0.7])
    den = GaussianMixtureDenoiser(dist.means, dist.covs, dist.weights)
    s = 0.5
    noisy = draw_mixture(dist)(200_000, gen)
    noisy = noisy + s * torch.randn(noisy.shape, generator=gen, dtype=torch.float64)
    log_ps = noisy_mixture_log_prob(dist, s)
    tv, se = mc_final_step_term(den, dist.log_prob, log_ps, noisy, s, torch.zeros(1, dtype=torch.float64))
    x = torch.linspace(-8, 8, 200_001, dtype=torch.float64)[:, None]
    y = den(x, torch.tensor(s))[:, 0]
    slope_ = torch.gradient(y, spacing=(x[:, 0],))[0]
    gap = (log_ps(x).exp() - dist.log_prob(y[:, None]).double().exp() * slope_).abs()
    quadrature = 0.5 * float(torch.trapezoid(gap, x[:, 0]))
    assert tv > 0.05
    assert abs(tv - quadrature) < 4 * se


def test_final_step_with_a_linear_error_through_the_change_of_variables():
    """1-D Gaussian, error ``u(z) = z / r``: the last step is ``y = a + b x`` with ``x ~ N(m, c + s^2)``,
    so its TV to the data is exact. The Monte Carlo term (autograd Jacobian of the perturbed
    denoiser) and Pinsker's closed-form term agree with it."""
    from lightning_diff.diffusion.tv_bound import final_step_term

    m, c, s, eps = 0.4, 0.5, 0.5, 1.0
    dist, den = _one_component([m], [c])
    f64 = torch.float64
    error = ScoreError.linear(torch.tensor([m], dtype=f64), torch.tensor([[c]], dtype=f64), seed=0)
    ab = 1 / (1 + s**2)
    r = math.sqrt(ab * (m**2 + c) + 1 - ab)  # RMS of z under the VP marginal
    k = eps * s**2 / math.sqrt(1 + s**2) / r
    b = c / (c + s**2) + k / math.sqrt(1 + s**2)
    a = m - c / (c + s**2) * m
    out_mean, out_std = a + b * m, b * math.sqrt(c + s**2)
    exact = gaussian_tv_1d(m, math.sqrt(c), out_mean, out_std)
    gen = torch.Generator().manual_seed(0)
    noisy = draw_mixture(dist)(200_000, gen)
    noisy = noisy + s * torch.randn(noisy.shape, generator=gen, dtype=torch.float64)
    perturbed = PerturbedDenoiser(den, eps, error)
    tv, se = mc_final_step_term(
        perturbed,
        dist.log_prob,
        noisy_mixture_log_prob(dist, s),
        noisy,
        s,
        torch.zeros(1, dtype=torch.float64),
    )
    assert exact > 0.05 and se < 0.02 * exact
    assert abs(tv - exact) < 4 * se
    data = (torch.tensor([m], dtype=f64), torch.tensor([[c]], dtype=f64))
    out = (torch.tensor([out_mean], dtype=f64), torch.tensor([[out_std**2]], dtype=f64))
    pinsker = math.sqrt(min(gaussian_kl(*data, *out), gaussian_kl(*out, *data)) / 2)
    assert final_step_term(*data, s, eps, error) == pytest.approx(pinsker, rel=1e-9)
    assert exact <= pinsker


def test_mixture_cells_with_a_linear_error_stay_within_their_bound():
    dist = GaussianMixture(num_components=4, radius=2.0, std=0.4)
    options = {"num_samples": 20_000, "seed": 0, "bins": 20, "bound_samples": 512}
    rows = {
        (kind, eps): run_cell(
            dist,
            sampler("euler_maruyama", 50),
            Cell("euler_maruyama", 50, eps, 20.0),
            0.1,
            1e-3,
            options,
            kind,
        )
        for kind in ("constant", "linear")
        for eps in (0.0, 0.3)
    }
    for row in rows.values():
        assert row["bound"] is not None and row["within_bound"], row
    # an error of RMS 0.3 is seen above the histogram floor, whatever its shape
    for kind in ("constant", "linear"):
        assert rows[(kind, 0.3)]["tv"] > rows[(kind, 0.0)]["tv"] + 2 * rows[(kind, 0.0)]["tv_floor"]


def test_ld_tv_writes_rows_summary_and_figures(tmp_path):
    out = tmp_path / "tv.json"
    cmd = [
        sys.executable,
        "-m",
        "lightning_diff.cli.tv",
        f"out={out}",
        "data.distribution.dim=1",
        "samplers=[ancestral,euler_maruyama]",
        "steps=[10,20,40,80]",
        "score_errors=[0.01,0.1]",
        "horizons=[2.0]",
        "reference.steps=80",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["sampler"] for r in rows} == {"ancestral", "euler_maruyama"}
    assert len(rows) == 2 * (4 + 2 + 1)
    for r in rows:
        assert {"sampler", "steps", "score_error", "horizon", "tv", "kl", "bound", "tv_method"} <= set(r)
    slope = result["summary"]["euler_maruyama"]["step_size_slope"]
    assert 0.7 < slope["slope"] < 1.3  # first order in the step size
    for key in ("steps", "score_error"):
        assert (tmp_path / f"tv_tv_vs_{key}.png").is_file()


def test_ld_tv_bad_input_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "lightning_diff.cli.tv", f"out={tmp_path / 'x.json'}", "samplers=[nope]"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no sampler 'nope'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data=moons", "known density"),
        ("design=full", "design="),
        ("perturbation=quadratic", "perturbation="),
    ],
)
def test_ld_tv_rejects_unknown_densities_and_designs(tmp_path, override, message):
    from hydra import compose, initialize_config_dir

    from lightning_diff.cli import CONF_DIR
    from lightning_diff.cli.tv import study
    from lightning_diff.errors import ConfigError

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "tv",
            overrides=[
                override,
                f"out={tmp_path / 'x.json'}",
                "steps=[5]",
                "score_errors=[]",
                "horizons=[]",
                "reference.steps=5",
                "samplers=[ddim]",
            ],
        )
    with pytest.raises(ConfigError, match=message):
        study(cfg)


def test_a_gaussian_given_by_its_mean_and_covariance_takes_their_dimension(tmp_path):
    """No data.distribution.dim needed: a 3-D mean and covariance make a 3-D study."""
    from hydra import compose, initialize_config_dir

    from lightning_diff.cli import CONF_DIR
    from lightning_diff.cli.tv import study

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "tv",
            overrides=[
                "data.distribution.mean=[2.0,-1.0,0.5]",
                "data.distribution.cov=[[2.0,0.5,0.0],[0.5,1.0,0.2],[0.0,0.2,0.3]]",
                f"out={tmp_path / 'x.json'}",
                "steps=[5]",
                "score_errors=[]",
                "horizons=[]",
                "reference.steps=5",
                "samplers=[exponential]",
                "tv.num_samples=20000",
                "figures=false",
            ],
        )
    (row,) = study(cfg)["rows"]
    assert row["draws"] > 0 and row["within_bound"] and 0 < row["tv"] < 1
    assert json.loads((tmp_path / "x.json").read_text())["data"]["mean"] == [2.0, -1.0, 0.5]
