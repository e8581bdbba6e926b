"""Probability-flow ODE samplers and the ODE likelihood against closed-form Gaussian answers.

For data N(mu, Sigma), Sigma = U diag(lambda) U^T, the flow has a closed form: with
c = U^T (x - mu), c_k(sigma) = c_k(sigma0) sqrt((lambda_k + sigma^2) / (lambda_k + sigma0^2))
(Wang & Vastola 2024), and along it the log density changes by
sum_k 1/2 log((lambda_k + sigma_max^2) / (lambda_k + sigma_min^2)) for every starting point.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_named, compose_train
from hydra.utils import instantiate
from scipy.stats import multivariate_normal

from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.train import train
from lightning_diff.diffusion import DiscreteSchedule, GaussianDenoiser, Sampler
from lightning_diff.diffusion.log_likelihood import bits_per_dim, dequantize, ode_log_likelihood, sigma_range
from lightning_diff.diffusion.ode import sample_heun, sample_ode_adaptive, solve_dopri5
from lightning_diff.errors import ConfigError
from lightning_diff.metrics.likelihood import heldout_data

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
# 3-D, eigenvalues spread over three decades (close to rank one).
MEAN3 = torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)
_Q = torch.linalg.qr(torch.tensor([[1.0, 0.2, 0.3], [0.4, 1.0, -0.2], [-0.3, 0.5, 1.0]]).double())[0]
COV3 = _Q @ torch.diag(torch.tensor([2.0, 0.3, 0.002], dtype=torch.float64)) @ _Q.T
N = 20000
SCHEDULE = DiscreteSchedule()


def closed_form_flow(den: GaussianDenoiser, x: torch.Tensor, sigma0: float, sigma1: float) -> torch.Tensor:
    c = (x.double() - den.mean) @ den.eigvecs
    c = c * ((den.eigvals + sigma1**2) / (den.eigvals + sigma0**2)).sqrt()
    return den.mean + c @ den.eigvecs.T


def noise(n: int, dim: int, sigma: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * sigma


def geometric_grid(num_steps: int) -> torch.Tensor:
    """``num_steps`` levels from the schedule's sigma_max to sigma_min, evenly in log sigma, then 0."""
    lo, hi = math.log(SCHEDULE.sigma_min), math.log(SCHEDULE.sigma_max)
    levels = torch.linspace(hi, lo, num_steps, dtype=torch.float64).exp()
    return torch.cat([levels, levels.new_zeros(1)])


# ---- (a) the samplers reproduce a Gaussian ---------------------------------------------------------


@pytest.mark.parametrize(
    "fn, num_steps",
    [(sample_heun, 50), (functools.partial(sample_ode_adaptive, rtol=1e-4, atol=1e-4), 1000)],
    ids=["heun_50", "rk45"],
)
def test_ode_samplers_reproduce_gaussian(fn, num_steps):
    """20000 samples: Monte Carlo standard errors about 0.01 per mean and covariance entry.

    Measured errors: Heun (50 steps, 99 evaluations) 0.021 on the mean and 0.012 on the covariance,
    RK45 (87 evaluations) 0.020 and 0.010 (the mean error includes the prior's missing mean, shrunk by
    the flow to about 0.006); tolerance 0.04 as for the other samplers (tests/test_samplers.py).
    """
    x, _ = Sampler(fn, num_steps)(
        GaussianDenoiser(MEAN, COV), SCHEDULE, (N, 2), torch.Generator().manual_seed(0)
    )
    x = x.double()
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=0.04, rtol=0)


def test_heun_converges_at_second_order():
    """Against the exact flow from the same noise, Heun's error falls about 4x per doubling of steps.

    The last step is Euler to sigma = 0, i.e. D(x, sigma_last), so the reference is the closed-form
    flow down to sigma_last followed by the same denoising. Measured: 0.19, 0.040, 0.0094 at 16,
    32, 64 steps.
    """
    den = GaussianDenoiser(MEAN, COV)
    x = noise(256, 2, SCHEDULE.sigma_max)
    errors = []
    for n in (16, 32, 64):
        sigmas = geometric_grid(n)
        exact = den(closed_form_flow(den, x, float(sigmas[0]), float(sigmas[-2])), sigmas[-2])
        out, _ = sample_heun(den, x, sigmas)
        errors.append((out - exact).abs().max().item())
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5 and errors[2] < 0.02


# ---- (b) evaluation counts -------------------------------------------------------------------------


def test_heun_costs_two_evaluations_per_step_but_the_last():
    calls = []

    class Counting(GaussianDenoiser):
        def forward(self, x, sigma):
            calls.append(1)
            return super().forward(x, sigma)

    for n in (2, 5, 18):
        calls.clear()
        _, nfe = Sampler(sample_heun, n)(Counting(MEAN, COV), SCHEDULE, (4, 2))
        assert nfe == len(calls) == 2 * n - 1


def test_adaptive_nfe_falls_with_looser_tolerances():
    """One sample: 1 initial evaluation + 6 per attempted step (FSAL), and the denoising step is free."""
    den = GaussianDenoiser(MEAN, COV)
    x = noise(1, 2, SCHEDULE.sigma_max)
    counts = [
        sample_ode_adaptive(den, x, geometric_grid(2), rtol=tol, atol=tol)[1] for tol in (1e-3, 1e-5, 1e-7)
    ]
    assert counts[0] < counts[1] < counts[2]
    assert all((c - 1) % 6 == 0 for c in counts)


# ---- (c) the adaptive solver against the closed-form flow ------------------------------------------


def test_adaptive_endpoint_matches_closed_form_flow():
    """sigma_max to sigma_min (no final denoising, the grid does not end at 0); measured 3.8e-5."""
    den = GaussianDenoiser(MEAN, COV)
    x = noise(256, 2, SCHEDULE.sigma_max)
    sigmas = torch.tensor([SCHEDULE.sigma_max, SCHEDULE.sigma_min], dtype=torch.float64)
    out, _ = sample_ode_adaptive(den, x, sigmas)
    torch.testing.assert_close(out, closed_form_flow(den, x, *sigmas.tolist()), atol=1e-4, rtol=0)
    # With a final 0 the sampler returns D(x, sigma_min) at the same end point.
    denoised, _ = sample_ode_adaptive(den, x, torch.cat([sigmas, sigmas.new_zeros(1)]))
    torch.testing.assert_close(denoised, den(out, sigmas[-1]), atol=1e-4, rtol=0)


def test_adaptive_steps_are_per_sample_and_sync_free_of_results():
    """A sample's result does not depend on its batch, nor on how often the host checks for the end."""
    den = GaussianDenoiser(MEAN, COV)
    x = noise(8, 2, SCHEDULE.sigma_max, seed=3)
    sigmas = geometric_grid(2)
    whole, _ = sample_ode_adaptive(den, x, sigmas)
    alone = torch.cat([sample_ode_adaptive(den, x[i : i + 1], sigmas)[0] for i in range(3)])
    torch.testing.assert_close(whole[:3], alone, atol=1e-12, rtol=0)
    checked_each_step, _ = sample_ode_adaptive(den, x, sigmas, check_every=1)
    torch.testing.assert_close(whole, checked_each_step, atol=0, rtol=0)


def test_solver_asks_the_host_only_every_check_every_iterations(monkeypatch):
    """The loop keeps its state on the device: the only reads back are the periodic ``all()`` checks."""
    reads = []
    for name in ("__bool__", "item", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a)
        )
    sol = solve_dopri5(lambda t, y: -y, torch.ones(4, 3), 0.0, 20.0, rtol=1e-6, atol=1e-6, check_every=8)
    monkeypatch.undo()
    assert sol.iterations > 16
    assert len(reads) == math.ceil((sol.iterations + 1) / 8)


def test_solver_gives_up_after_max_steps():
    with pytest.raises(RuntimeError, match="max_steps"):
        solve_dopri5(lambda t, y: -50 * y, torch.ones(2, 3), 0.0, 10.0, rtol=1e-9, atol=1e-9, max_steps=5)


def test_solver_on_exponential_decay():
    """dy/dt = -y per sample with its own end time: y(t1) = y0 exp(-t1)."""
    y0 = torch.tensor([[1.0], [2.0], [-3.0]], dtype=torch.float64)
    t1 = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    sol = solve_dopri5(lambda t, y: -y, y0, 0.0, t1, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sol.y, y0 * (-t1[:, None]).exp(), atol=1e-7, rtol=0)
    assert sol.nfe[2] == 1 and sol.nfe[1] > sol.nfe[0]


# ---- (d) the ODE likelihood -------------------------------------------------------------------------


def gaussian_case(mean, cov, n, seed=0):
    den = GaussianDenoiser(mean, cov)
    gen = torch.Generator().manual_seed(seed)
    x0 = (
        mean
        + torch.randn(n, len(mean), dtype=torch.float64, generator=gen)
        @ torch.linalg.cholesky(cov + 1e-12 * torch.eye(len(mean), dtype=torch.float64)).T
    )
    return den, x0


def exact_delta(den: GaussianDenoiser, sigma_min: float, sigma_max: float) -> float:
    lam = den.eigvals
    return float(0.5 * ((lam + sigma_max**2) / (lam + sigma_min**2)).log().sum())


@pytest.mark.parametrize("case", ["2d", "3d_low_rank"])
def test_exact_trace_likelihood_matches_gaussian_density(case):
    """Exact trace, rtol = atol = 1e-5: the density change to 1e-3 (measured 1.1e-4), the latent
    to the closed-form flow, and log p(x0) to the analytic log N(x0; mu, Sigma + sigma_min^2 I).

    The last comparison also carries the prior's mismatch: the model's marginal at sigma_max is
    N(mu, Sigma + sigma_max^2 I) while the prior is N(0, (1 + sigma_max^2) I); its log-ratio at the
    latent (measured up to 0.017 here, of order |mu| |c| / sigma_max) is computed and added.
    """
    mean, cov = (MEAN, COV) if case == "2d" else (MEAN3, COV3)
    den, x0 = gaussian_case(mean, cov, 64)
    sigma_min, sigma_max = sigma_range(SCHEDULE)
    out = ode_log_likelihood(den, x0, SCHEDULE, exact_trace=True)
    delta = torch.full_like(out["delta_logp"], exact_delta(den, sigma_min, sigma_max))
    torch.testing.assert_close(out["delta_logp"], delta, atol=1e-3, rtol=0)
    latent = closed_form_flow(den, x0, sigma_min, sigma_max)
    # The flow stretches the smallest-eigenvalue direction ~3000-fold; the tolerances control the error
    # relative to the whole state, so that direction ends up 4e-3 off relatively (measured).
    torch.testing.assert_close(out["latent"], latent, atol=1e-3, rtol=1e-2)

    dim = len(mean)
    eye = torch.eye(dim, dtype=torch.float64)
    data_logp = torch.distributions.MultivariateNormal(mean, cov + sigma_min**2 * eye).log_prob(x0)
    marginal = torch.distributions.MultivariateNormal(mean, cov + sigma_max**2 * eye).log_prob(latent)
    std = float(SCHEDULE.prior_std(sigma_max))
    prior = torch.distributions.MultivariateNormal(torch.zeros(dim, dtype=torch.float64), std**2 * eye)
    mismatch = prior.log_prob(latent) - marginal
    assert mismatch.abs().max() < 0.05
    torch.testing.assert_close(out["prior_logp"], prior.log_prob(latent), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["log_likelihood"], data_logp + mismatch, atol=2e-3, rtol=0)
    assert out["nfe"] > 1


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased_with_the_predicted_spread(probe):
    """With probes fixed along a trajectory the estimate of the density change is
    ``dim T - v^T M v`` with ``M = U diag(m) U^T``, ``m_k = T - 1/2 log((lambda_k + sigma_max^2) /
    (lambda_k + sigma_min^2))`` the integrated denoiser Jacobian and ``T = log(sigma_max / sigma_min)``.
    Its variance is ``2 sum_{i != j} M_ij^2`` for Rademacher and ``2 ||M||_F^2`` for Gaussian probes,
    divided by the number of probes. Over 256 points x 4 probes the mean error must lie within 4
    standard errors of 0, and the per-point spread within 30% of the prediction.
    """
    den, x0 = gaussian_case(MEAN3, COV3, 256, seed=1)
    sigma_min, sigma_max = sigma_range(SCHEDULE)
    num_probes = 4
    out = ode_log_likelihood(
        den, x0, SCHEDULE, num_probes=num_probes, probe=probe, generator=torch.Generator().manual_seed(5)
    )
    span = math.log(sigma_max / sigma_min)
    m = span - 0.5 * ((den.eigvals + sigma_max**2) / (den.eigvals + sigma_min**2)).log()
    M = den.eigvecs @ torch.diag(m) @ den.eigvecs.T
    var = 2 * (M**2).sum() - (2 * M.diagonal().pow(2).sum() if probe == "rademacher" else 0)
    predicted_std = float((var / num_probes).sqrt())
    error = out["delta_logp"] - exact_delta(den, sigma_min, sigma_max)
    assert abs(float(error.mean())) < 4 * predicted_std / math.sqrt(len(error)) + 1e-3
    assert 0.7 < float(error.std()) / predicted_std < 1.3


def test_heun_likelihood_and_bad_options():
    """Fixed-step Heun in log sigma approaches the adaptive answer at second order (2 evaluations a step).

    Measured: 0.40 and 0.033 nats at 25 and 100 steps.
    """
    den, x0 = gaussian_case(MEAN, COV, 16)
    adaptive = ode_log_likelihood(den, x0, SCHEDULE, exact_trace=True)["log_likelihood"]
    errors = []
    for n in (25, 100):
        out = ode_log_likelihood(den, x0, SCHEDULE, exact_trace=True, method="heun", num_steps=n)
        assert out["nfe"] == 2 * n
        errors.append((out["log_likelihood"] - adaptive).abs().max().item())
    assert errors[1] < errors[0] / 8 and errors[1] < 0.05
    with pytest.raises(ConfigError, match="probe"):
        ode_log_likelihood(den, x0, SCHEDULE, probe="sphere")
    with pytest.raises(ConfigError, match="solver"):
        ode_log_likelihood(den, x0, SCHEDULE, method="euler")


def test_sigma_range_defaults():
    """A schedule's own sigma_min / sigma_max, else the end points of its sampling grid."""

    class GridOnly:
        def sampling_sigmas(self, num_steps, spacing="uniform"):
            levels = torch.linspace(80.0, 0.002, num_steps, dtype=torch.float64)
            return torch.cat([levels, levels.new_zeros(1)])

    assert sigma_range(GridOnly()) == pytest.approx((0.002, 80.0))
    assert sigma_range(SCHEDULE) == (SCHEDULE.sigma_min, SCHEDULE.sigma_max)
    assert SCHEDULE.sampling_sigmas(1000)[-2] == SCHEDULE.sigma_min


# ---- (e) bits per dimension --------------------------------------------------------------------------


def test_bits_per_dim_by_hand():
    # 64 dims, log p = -100 nats: 100 / (64 ln 2) = 2.25421 bits, plus 7 for [-1, 1] data.
    bpd = bits_per_dim(torch.tensor([-100.0], dtype=torch.float64), 64)
    assert abs(float(bpd) - (100 / (64 * 0.6931471805599453) + 7)) < 1e-12
    assert abs(float(bpd) - 9.254211) < 1e-5
    # The uniform density on [-1, 1]^D (log p = -D ln 2) is 8 bits: one of 256 levels per dimension.
    assert abs(float(bits_per_dim(torch.tensor([-64 * math.log(2)]), 64)) - 8.0) < 1e-5
    assert float(bits_per_dim(torch.tensor([-6.0]), 3, data="vectors")) == 2.0
    with pytest.raises(ConfigError):
        bits_per_dim(torch.tensor([0.0]), 1, data="audio")


def test_dequantize_fills_each_level_bin():
    levels = torch.arange(256, dtype=torch.float64).repeat(200)
    x = (levels / 127.5 - 1).float().reshape(-1, 1, 16, 16)  # as the image loaders store them
    out = dequantize(x, torch.Generator().manual_seed(0)).double().reshape(-1)
    u = (out + 1) * 128 - levels  # (k + u) / 128 - 1
    assert u.min() >= 0 and u.max() <= 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005
    assert out.min() >= -1 and out.max() <= 1


# ---- (f) ld-eval and the training callback ------------------------------------------------------------

# nats/dim allowed for the rk45 solve at rtol = atol = 1e-5 plus the ODE likelihood's sigma_min and prior
# offsets from the exact Gaussian density (see test_eval_reports_heldout_nll_of_a_checkpoint).
SOLVER = 1e-3
FAST = ["likelihood.num_samples=12", "likelihood.rtol=1e-3", "likelihood.atol=1e-3", "num_samples=20"]


def hutchinson_sem_per_dim(cov: np.ndarray, sigma_min: float, sigma_max: float, n: int, num_probes: int = 1):
    """Standard error, in nats/dim, of the mean over ``n`` rows of the Rademacher trace estimate's error
    for the Gaussian model N(mu, cov): per row ``sqrt(2 sum_{i != j} M_ij^2 / num_probes)`` with
    ``M = U diag(T - 1/2 log((lambda + sigma_max^2) / (lambda + sigma_min^2))) U^T``, ``T = log(sigma_max /
    sigma_min)`` (see test_hutchinson_likelihood_is_unbiased_with_the_predicted_spread)."""
    lam, vecs = np.linalg.eigh(cov)
    span = math.log(sigma_max / sigma_min)
    m = span - 0.5 * np.log((lam + sigma_max**2) / (lam + sigma_min**2))
    M = vecs @ np.diag(m) @ vecs.T
    var = 2 * ((M**2).sum() - (np.diag(M) ** 2).sum()) / num_probes
    return math.sqrt(var / n) / len(cov)


def test_eval_reports_heldout_nll_of_a_checkpoint(tmp_path):
    """ld-eval's held-out NLL: independent of the batch size, refused without a checkpoint, and for
    ``model=gaussian`` equal to the exact ``-log N(x; mu, Sigma) / dim`` of the same held-out rows.

    The exact answer uses the mean and covariance the trained model holds, through scipy, on the rows
    ``heldout_data`` draws for ld-eval (256 of the 400 held out, from the same data config), so the
    rows' own spread cancels. What is left:
    - the Hutchinson estimate's noise: one Rademacher probe per row, whose spread is known in closed
      form for a Gaussian model (hutchinson_sem_per_dim: 0.0181 nats/dim here; 0.0177 measured over
      the rows); 4 standard errors;
    - SOLVER: the rk45 solve at rtol = atol = 1e-5 and the ODE likelihood's own departures from
      log N(x; mu, Sigma): the data stand at sigma_min (the density of N(mu, Sigma + sigma_min^2 I),
      +2e-5 nats/dim here) and the prior N(0, (1 + sigma_max^2) I) is not exactly the model's
      marginal at sigma_max (-4.0e-4 nats/dim here). The exact-trace run checks this part alone, and
      so pins the rows too: the first 256 held-out rows instead are 0.040 nats/dim off.
    Measured: exact 0.99597 nats/dim; reported 1.02666 (Hutchinson, 1.7 standard errors off, tolerance
    0.0735) and 0.99562 (exact trace, 3.5e-4 off); under a mean shifted by 0.5 the exact NLL is 1.585.
    """
    run_dir = tmp_path / "run"
    train(compose_train(["data=moons", "trainer.max_steps=3"], run_dir))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "m.json"
    overrides = [f"ckpt={ckpt}", f"out={out}", "likelihood.enabled=true", *FAST]
    metrics = evaluate(compose_named("eval", overrides))
    assert math.isfinite(metrics["nll_nats_per_dim"]) and metrics["likelihood_nfe"] > 1
    assert json.loads(out.read_text())["eval/nll_nats_per_dim"] == metrics["nll_nats_per_dim"]
    # Row i draws its probes from (sample_seed, i): the batch size does not change the number.
    again = evaluate(compose_named("eval", [*overrides, "batch_size=5"]))
    assert abs(again["nll_nats_per_dim"] - metrics["nll_nats_per_dim"]) < 1e-4
    with pytest.raises(ConfigError, match="ckpt"):
        evaluate(compose_named("eval", [f"samples={out}", "data=moons", "likelihood.enabled=true"]))

    # The Gaussian model fitted to 3-D Gaussian data: 256 of the 400 held-out rows (default options).
    gauss_dir = tmp_path / "gauss"
    cfg = compose_train(
        ["model=gaussian", "data=gaussian", "data.distribution.dim=3", "data.num_samples=4000"], gauss_dir
    )
    _, objects = train(cfg)
    model = objects["model"]
    mean, cov = model.fit_mean.cpu().numpy(), model.fit_cov.cpu().numpy()
    num_rows, dim = 256, len(mean)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    rows = heldout_data(datamodule, num_rows).double().numpy()  # ld-eval's rows: the same data config
    assert rows.shape == (num_rows, dim) and len(datamodule.val_tensor()) == 400
    exact = float(-multivariate_normal(mean, cov).logpdf(rows).mean() / dim)
    wrong = float(-multivariate_normal(mean + 0.5, cov).logpdf(rows).mean() / dim)

    sigma_min, sigma_max = sigma_range(model.schedule)
    tolerance = 4 * hutchinson_sem_per_dim(cov, sigma_min, sigma_max, num_rows) + SOLVER
    gauss = [
        f"ckpt={gauss_dir / 'checkpoints' / 'last.ckpt'}",
        f"out={tmp_path / 'g.json'}",
        "likelihood.enabled=true",
        f"likelihood.num_samples={num_rows}",
        "num_samples=20",
    ]
    reported = evaluate(compose_named("eval", gauss))["nll_nats_per_dim"]
    assert abs(reported - exact) < tolerance, (reported, exact, tolerance)
    assert abs(reported - wrong) > tolerance, (reported, wrong, tolerance)  # the check has teeth
    exact_trace = evaluate(compose_named("eval", [*gauss, "likelihood.exact_trace=true"]))["nll_nats_per_dim"]
    assert abs(exact_trace - exact) < SOLVER, (exact_trace, exact)
    assert abs(exact_trace - wrong) > SOLVER


def test_likelihood_callback_logs_bits_per_dim(tmp_path):
    """The callback's ``eval/bits_per_dim`` at the end of training is what ld-eval reports for that run's
    last.ckpt with the same rows, seed and options (the callback's ``seed`` is ld-eval's ``sample_seed``;
    both use the EMA weights): the same computation on the same weights, so equal up to float
    rounding (measured identical in metrics.json; the dict ``train`` returns passes through float32,
    2.4e-7 off). The seed and the probes are not the defaults, so each must be passed on; Gaussian
    probes, because the barely trained net's Jacobian is near diagonal and Rademacher probes read a
    diagonal exactly whatever the seed. ld-eval at its default seed is 0.33 bits/dim off (measured).
    """
    likelihood = {
        "seed": 7,
        "num_samples": 8,
        "probe": "gaussian",
        "num_probes": 2,
        "rtol": 1e-3,
        "atol": 1e-3,
    }
    overrides = [
        "data=digits",
        "trainer.max_steps=2",
        "callbacks=with_likelihood",
        *[f"callbacks.likelihood.{k}={v}" for k, v in likelihood.items()],
    ]
    run_dir = tmp_path / "run"
    metrics, _ = train(compose_train(overrides, run_dir))
    written = json.loads((run_dir / "metrics.json").read_text())["eval/bits_per_dim"]
    assert 0 < written < 20 and written == pytest.approx(metrics["eval/bits_per_dim"], abs=1e-6)

    options = {k: v for k, v in likelihood.items() if k != "seed"}
    eval_overrides = [
        f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"out={tmp_path / 'eval.json'}",  # not the run's own metrics.json
        "num_samples=20",
        "likelihood.enabled=true",
        *[f"likelihood.{k}={v}" for k, v in options.items()],
    ]
    reported = evaluate(compose_named("eval", [*eval_overrides, f"sample_seed={likelihood['seed']}"]))
    assert abs(reported["bits_per_dim"] - written) < 1e-5, (reported["bits_per_dim"], written)
    other_seed = evaluate(compose_named("eval", eval_overrides))  # sample_seed=12345: other probes
    assert abs(other_seed["bits_per_dim"] - written) > 1e-5
