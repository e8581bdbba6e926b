"""Score SDEs (Song et al. 2021): marginals against simulation, conversions, samplers, training.

Sampler checks follow tests/test_samplers.py: the closed-form Gaussian denoiser, a correlated 2-D
target N(mu, Sigma) and 20000 samples, so the Monte Carlo standard error of a mean or covariance
entry is about 0.01. The bias of each sampler was measured separately:
- Euler-Maruyama, 1000 steps: 0.006 (VP, DDPM), 0.007 (sub-VP), 0.009 (VE) on the covariance,
  computed exactly by propagating the Gaussian's covariance through the linear update;
- predictor-corrector, 250 steps: the Langevin corrector at snr = 0.16 inflates the variance by
  about 0.015 whatever the step count (measured with 200000 samples), since in 2-D its step does
  not shrink with sigma;
- DDIM on an SDE grid, 200 steps: 0.03 at most; on VE the prior N(0, sigma_max^2) ignores the data
  mean, which shifts the mean by about |mu| sqrt(lambda) / sigma_max = 0.02.
The tolerance of 0.04 on mean and covariance entries sits above bias plus three standard errors.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import LEARN_GMM, compose_train, gaussian_adversary_ratio
from hydra.utils import instantiate

from lightning_diff.cli.train import train
from lightning_diff.diffusion import (
    SDE,
    VESDE,
    VPSDE,
    DiscreteSchedule,
    GaussianDenoiser,
    SampleGenerators,
    Sampler,
    SDEDenoiser,
    SubVPSDE,
    sample_ddim,
    sample_euler_maruyama,
    sample_exponential,
    sample_pc,
)
from lightning_diff.errors import ConfigError
from lightning_diff.models import ScoreSDE
from lightning_diff.nets import MLP

SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
N = 20000
TOL = 0.04


def make_schedule(name: str):
    return DiscreteSchedule() if name == "ddpm" else SDES[name]()


# ---- the forward SDEs -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_matches_simulation_of_the_forward_sde(name):
    """Euler-Maruyama of dz = f dt + g dW from a point x0, 10000 paths, 1000 steps on [0, 1].

    Tolerances: the mean within 4 standard errors (std_t / 100) plus 1% of alpha_t x0 for the
    first-order bias of the scheme; the std within 4% (its standard error is 0.7%). VE starts from
    x0 + sigma_min n, the paper's convention that t = 0 holds the data perturbed by sigma_min.
    """
    sde, x0, paths, steps = SDES[name](), 1.5, 10000, 1000
    gen = torch.Generator().manual_seed(0)
    z = torch.full((paths, 1), x0, dtype=torch.float64)
    if name == "ve":
        z = z + sde.sigma_min * torch.randn(paths, 1, generator=gen, dtype=torch.float64)
    dt = 1.0 / steps
    checks = {100: None, 300: None, 1000: None}
    for i in range(steps):
        t = torch.tensor(i * dt, dtype=torch.float64)
        noise = torch.randn(paths, 1, generator=gen, dtype=torch.float64)
        z = z + sde.drift(z, t) * dt + sde.diffusion(t) * math.sqrt(dt) * noise
        if i + 1 in checks:
            alpha, std = sde.marginal((i + 1) * dt)
            mean_err = (z.mean() - alpha * x0).abs()
            assert mean_err < 4 * std / math.sqrt(paths) + 0.01 * alpha * x0, (i + 1, mean_err)
            torch.testing.assert_close(z.std(), std, rtol=0.04, atol=0)


@pytest.mark.parametrize("name", list(SDES))
def test_sigma_and_t_of_sigma_are_inverse(name):
    sde = SDES[name]()
    t = torch.linspace(sde.train_eps, 1.0, 101, dtype=torch.float64)
    sigma = sde.sigma(t)
    assert (sigma[1:] > sigma[:-1]).all()
    torch.testing.assert_close(sde.t_of_sigma(sigma), t, rtol=0, atol=1e-10)
    alpha, std = sde.marginal(t)
    torch.testing.assert_close(sigma, std / alpha, rtol=1e-12, atol=0)
    levels = torch.logspace(-3, 1.5, 50, dtype=torch.float64)
    torch.testing.assert_close(sde.sigma(sde.t_of_sigma(levels)), levels, rtol=1e-10, atol=0)


def test_known_values_of_the_three_sdes():
    vp, subvp, ve = VPSDE(), SubVPSDE(), VESDE()
    # alpha(1) = exp(-(20 - 0.1) / 4 - 0.1 / 2); sub-VP's std has no square root.
    alpha1 = math.exp(-19.9 / 4 - 0.05)
    torch.testing.assert_close(vp.marginal(1.0)[0].item(), alpha1)
    torch.testing.assert_close(vp.marginal(1.0)[1].item(), math.sqrt(1 - alpha1**2))
    torch.testing.assert_close(subvp.marginal(1.0)[1].item(), 1 - alpha1**2)
    torch.testing.assert_close(
        ve.sigma(torch.tensor([0.0, 1.0])), torch.tensor([0.01, 50.0], dtype=torch.float64)
    )
    # The prior in x = z / alpha: N(0, I) in z for VP is std sqrt(1 + sigma^2); VE is N(0, sigma_max^2).
    sigma = vp.sigma(1.0)
    torch.testing.assert_close(vp.prior_std(sigma), (1 + sigma**2).sqrt())
    torch.testing.assert_close(subvp.prior_std(subvp.sigma(1.0)).item(), 1 / alpha1)
    torch.testing.assert_close(ve.prior_std(ve.sigma(1.0)).item(), 50.0)


@pytest.mark.parametrize("name", list(SDES))
def test_prior_logp_is_the_gaussian_density(name):
    sde = SDES[name]()
    z = torch.randn(4, 3, 2, dtype=torch.float64) * float(sde.prior_z_std(1.0))
    ref = torch.distributions.Normal(0.0, float(sde.prior_z_std(1.0))).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(sde.prior_logp(z), ref)


@pytest.mark.parametrize("name", list(SDES))
def test_probability_flow_with_the_exact_score_keeps_the_marginals(name):
    """The probability-flow ODE (eq. 13) of 1-D Gaussian data maps quantiles to quantiles.

    Data N(m, v); the exact score in z is -(z - alpha m) / (alpha^2 v + std^2). Starting at the
    c-quantile of p_T, 500 RK4 steps down to t = eps must land on the c-quantile of p_eps; the
    reverse SDE's diffusion must vanish for the ODE and equal g for the SDE.
    """
    sde, m, v = SDES[name](), 0.7, 0.5

    def moments(t):
        alpha, std = sde.marginal(t)
        return alpha * m, (alpha**2 * v + std**2).sqrt()

    def score(z, t):
        mean, s = moments(t)
        return -(z - mean) / s**2

    ode = sde.reverse(score, probability_flow=True)
    c = torch.tensor([[-2.0], [0.5], [1.5]], dtype=torch.float64)
    mean, s = moments(sde.T)
    z = mean + c * s
    ts = torch.linspace(sde.T, sde.eps, 501, dtype=torch.float64)
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        h = t1 - t0
        k1 = ode.drift(z, t0)
        k2 = ode.drift(z + h / 2 * k1, t0 + h / 2)
        k3 = ode.drift(z + h / 2 * k2, t0 + h / 2)
        k4 = ode.drift(z + h * k3, t1)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    mean, s = moments(sde.eps)
    torch.testing.assert_close(z, mean + c * s, rtol=1e-5, atol=1e-6)
    assert float(ode.diffusion(0.5)) == 0.0
    torch.testing.assert_close(sde.reverse(score).diffusion(0.5), sde.diffusion(0.5))


# ---- grids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SDES))
def test_sampling_sigmas(name):
    sde = SDES[name]()
    for spacing in ("uniform", "karras"):
        sig = sde.sampling_sigmas(10, spacing)
        assert sig.shape == (11,) and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
        torch.testing.assert_close(sig[0], sde.sigma(1.0))
        torch.testing.assert_close(sig[-2], sde.sigma(sde.eps))
    # t uniform from 1 to eps; the discrete schedule's spacings are aliases of uniform.
    t = sde.t_of_sigma(sde.sampling_sigmas(5)[:-1])
    torch.testing.assert_close(t, torch.linspace(1.0, sde.eps, 5, dtype=torch.float64))
    for alias in ("leading", "trailing", "linspace"):
        torch.testing.assert_close(sde.sampling_sigmas(7, alias), sde.sampling_sigmas(7))
    assert sde.sampling_sigmas(1).tolist() == [float(sde.sigma(1.0)), 0.0]
    with pytest.raises(ConfigError, match="unknown spacing"):
        sde.sampling_sigmas(10, "quadratic")


def test_discrete_schedule_accepts_uniform_spacing():
    schedule = DiscreteSchedule()
    torch.testing.assert_close(
        schedule.sampling_sigmas(20, "uniform"), schedule.sampling_sigmas(20, "linspace")
    )


# ---- the denoiser adapter -------------------------------------------------------------------


class NoiseOracle(torch.nn.Module):
    """Returns the noise that made z, and records what the adapter fed it."""

    def __init__(self, noise):
        super().__init__()
        self.noise = noise

    def forward(self, z, c_noise):
        self.seen = (z, c_noise)
        return self.noise


@pytest.mark.parametrize("name", list(SDES))
def test_sde_denoiser_recovers_x0_from_the_noise(name):
    sde = SDES[name]()
    x0, noise = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    alpha, std = sde.marginal(t)
    z = alpha[:, None] * x0 + std[:, None] * noise
    net = NoiseOracle(noise)
    den = SDEDenoiser(net, sde)
    x, sigma = z / alpha[:, None], sde.sigma(t)
    torch.testing.assert_close(den(x, sigma), x0)
    torch.testing.assert_close(net.seen[0], z)
    torch.testing.assert_close(net.seen[1], 999 * t)
    # Score in z is the interface's score divided by alpha (MATH.md, "One interface").
    torch.testing.assert_close(den.score_z(z, t), den.score(x, sigma) / alpha[:, None])
    torch.testing.assert_close(den.score_z(z, t), -noise / std[:, None])


# ---- samplers on the closed-form Gaussian ---------------------------------------------------


def draw(fn, num_steps, schedule, dtype=torch.float32, seed=0):
    """Like ``Sampler.__call__`` but in a chosen dtype."""
    gen = torch.Generator().manual_seed(seed)
    sigmas = schedule.sampling_sigmas(num_steps, "uniform")
    x = torch.randn(N, 2, generator=gen, dtype=dtype) * float(schedule.prior_std(sigmas[0]))
    samples, _ = fn(GaussianDenoiser(MEAN, COV), x, sigmas, gen)
    return samples.double()


def assert_reproduces_gaussian(x):
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.mean(0), MEAN, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "ddpm"])
def test_euler_maruyama_reproduces_gaussian(name):
    assert_reproduces_gaussian(draw(sample_euler_maruyama, 1000, make_schedule(name)))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "ddpm"])
def test_exponential_integrator_reproduces_gaussian(name):
    assert_reproduces_gaussian(draw(sample_exponential, 1000, make_schedule(name)))


@pytest.mark.parametrize("snr", [None, 0.16], ids=["default_snr", "paper_snr"])
@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "ddpm"])
def test_predictor_corrector_reproduces_gaussian(name, snr):
    """Sub-VP runs in float64: its last level sigma(1e-3) = 1.1e-4 puts the score (D - x) / sigma^2
    below float32's resolution of x, and the corrector's 2-D step does not shrink with sigma. With
    the exact denoiser both the vectors' default snr (at the default 1000 steps; at 250 its weaker
    corrector leaves the predictor's discretisation bias, 0.042 on VP) and the paper's 0.16 are
    accurate."""
    dtype = torch.float64 if name == "subvp" else torch.float32
    fn = functools.partial(sample_pc, snr=snr)
    steps = 1000 if snr is None else 250
    assert_reproduces_gaussian(draw(fn, steps, make_schedule(name), dtype))


@pytest.mark.parametrize("name", list(SDES))
def test_ddim_runs_on_an_sde_schedule(name):
    assert_reproduces_gaussian(draw(functools.partial(sample_ddim, eta=0.0), 200, make_schedule(name)))


class CountingDenoiser(GaussianDenoiser):
    calls = 0

    def forward(self, x, sigma):
        self.calls += 1
        return super().forward(x, sigma)


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (sample_euler_maruyama, 12),
        (sample_pc, 12 + 11),
        (functools.partial(sample_pc, num_corrector_steps=3), 12 + 3 * 11),
    ],
    ids=["em", "pc1", "pc3"],
)
def test_nfe_counts_every_model_evaluation(fn, expected):
    den = CountingDenoiser(MEAN, COV)
    _, nfe = Sampler(fn, num_steps=12)(den, VPSDE(), (5, 2), torch.Generator().manual_seed(0))
    assert nfe == den.calls == expected


@pytest.mark.parametrize(
    "fn", [sample_euler_maruyama, functools.partial(sample_pc, norms="sample")], ids=["em", "pc_sample_norms"]
)
def test_per_sample_seeds_do_not_depend_on_batching(fn):
    den, sde = GaussianDenoiser(MEAN, COV), VESDE()
    sampler = Sampler(fn, num_steps=10)
    whole, _ = sampler(den, sde, (10, 2), SampleGenerators(range(10), seed=3))
    parts = [sampler(den, sde, (len(r), 2), SampleGenerators(r, seed=3))[0] for r in (range(4), range(4, 10))]
    torch.testing.assert_close(torch.cat(parts), whole)


def test_unknown_corrector_norms_is_a_config_error():
    with pytest.raises(ConfigError, match="corrector norms"):
        Sampler(functools.partial(sample_pc, norms="median"), 3)(GaussianDenoiser(MEAN, COV), VPSDE(), (2, 2))


# ---- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "edm", "x0", "v"])
@pytest.mark.parametrize("weighting", ["std2", "likelihood"])
@pytest.mark.parametrize("name", list(SDES))
def test_loss_is_weighted_denoising_score_matching(name, weighting, prediction):
    """Recompute Song et al. eq. 7 with the score written out, lambda(t) ||s_theta + n / std||^2, in
    the SDE's coordinates, whatever the network predicts: the weighting is the paper's objective."""
    sde = SDES[name]()
    net = MLP(2, hidden_dim=16, num_layers=1)
    torch.nn.init.normal_(net.output_proj.weight)  # a net that does not output zeros
    model = ScoreSDE(net, sde, prediction=prediction, weighting=weighting, sigma_data=0.7)
    x0 = torch.randn(64, 2)
    loss = model.loss(x0, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = sde.train_eps + (1 - sde.train_eps) * torch.rand(64, generator=gen).double()
    noise = torch.randn(64, 2, generator=gen)
    alpha, std = sde.marginal(t)
    z = (alpha[:, None] * x0 + std[:, None] * noise).float()
    score = model.denoiser(use_ema=False).score_z(z, t).double()
    lam = std**2 if weighting == "std2" else sde.diffusion(t) ** 2
    ref = lam * (score + noise.double() / std[:, None]).pow(2).mean(1)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=1e-6)


def test_clip_denoised_clamps_sampling_but_not_the_loss():
    def model(clip):
        torch.manual_seed(0)
        net = MLP(2, hidden_dim=16, num_layers=1)
        torch.nn.init.normal_(net.output_proj.weight)
        return ScoreSDE(net, VESDE(), sigma_data=1.0, clip_denoised=clip)

    clipped, plain = model(True), model(False)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)) * 3  # well outside [-1, 1]
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(clipped.loss(x0, gen()), plain.loss(x0, gen()))
    x = torch.full((4, 2), 5.0)
    sigma = torch.full((4,), 0.1)
    assert clipped.denoiser()(x, sigma).abs().max() <= 1.0
    assert plain.denoiser()(x, sigma).abs().max() > 1.0  # the clamp is what bounds it


def test_unknown_weighting_is_a_config_error():
    with pytest.raises(ConfigError, match="model.weighting"):
        ScoreSDE(MLP(2), VPSDE(), weighting="snr")


@pytest.mark.parametrize("name", list(SDES))
def test_short_training_run_learns_the_data(name, tmp_path):
    """300 steps on the 8-Gaussian mixture (radius 4): the loss falls and Euler-Maruyama samples are
    far closer to the data than the moment-matched Gaussian, which has learned none of the modes."""
    cfg = compose_train(["model=score_sde", f"model/sde={name}", *LEARN_GMM], tmp_path / "run")
    _, objects = train(cfg)
    model, data = objects["model"], objects["datamodule"].train_tensor()[:2000]
    assert isinstance(model, ScoreSDE) and type(model.sde) is SDES[name]

    untrained = instantiate(cfg.model, net=instantiate(cfg.net, data_shape=(2,)))
    untrained.fit_data(objects["datamodule"].train_tensor())
    before = untrained.loss(data, torch.Generator().manual_seed(1)).mean()
    after = model.loss(data, torch.Generator().manual_seed(1)).mean()
    assert after < 0.95 * before  # edm targets keep an irreducible unit variance at high noise

    samples, nfe = model.sample(
        2000, (2,), Sampler(sample_euler_maruyama, 100), torch.Generator().manual_seed(2)
    )
    assert nfe == 100
    # The adversary: the data's own Gaussian (its mean and covariance), which has learned no mode.
    assert gaussian_adversary_ratio(samples, data) < 0.6


# ---- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc", "ddim", "ancestral"])
def test_every_sde_composes_with_every_sampler(name, sampler):
    cfg = compose_train(["model=score_sde", f"model/sde={name}", f"sampler={sampler}", "data=moons"])
    model = instantiate(cfg.model, net=instantiate(cfg.net, data_shape=(2,)))
    model.fit_data(torch.randn(64, 2))
    assert isinstance(model.sde, SDE) and type(model.sde) is SDES[name] and model.schedule is model.sde
    samples, _ = model.sample(4, (2,), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 2) and torch.isfinite(samples).all()


@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc"])
def test_sde_samplers_run_on_a_ddpm_model(sampler):
    cfg = compose_train(["model=ddpm", f"sampler={sampler}", "data=moons"])
    model = instantiate(cfg.model, net=instantiate(cfg.net, data_shape=(2,)))
    model.fit_data(torch.randn(64, 2))
    samples, _ = model.sample(4, (2,), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 2) and torch.isfinite(samples).all()
