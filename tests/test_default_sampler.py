"""The default sampler's own error is below the sampling noise of the data, on every family's schedule.

With the closed-form denoiser of a Gaussian N(mu, C) the only error left in the output is the
sampler's. The default sampler (``conf/train.yaml``, composed as ``ld-train`` does) is deterministic,
hence an affine map of its Gaussian input: running it on the input rows ``0, e_1, ..., e_d``
(scaled by the prior's std) gives the output's mean and covariance exactly, with no Monte Carlo
error. The bar is the noise floor of n = 4000 fresh samples of the true Gaussian: the RMS of
``||C_hat - C||_F / ||C||_F`` over such draws, ``sqrt(((tr C)^2 + ||C||_F^2) / (n - 1)) / ||C||_F``
(Wishart moments), 0.023 for the 2-D target. The old default (DDIM, 50 steps, leading spacing)
misses it on DDPM's schedule (0.071): the negative control.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_named
from hydra.utils import instantiate

from lightning_diff.diffusion import VPSDE, DiscreteSchedule, GaussianDenoiser, SampleGenerators, Sampler
from lightning_diff.errors import ConfigError

N_FLOOR = 4000
FAMILIES = {
    "ddpm": ["model=ddpm"],
    "gaussian": ["model=gaussian"],
    "vp": ["model=score_sde", "model/sde=vp"],
    "subvp": ["model=score_sde", "model/sde=subvp"],
    "ve": ["model=score_sde", "model/sde=ve"],
}


def gaussian_2d() -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (1, -0.5); eigenvalues 1 and 0.05, rotated by 0.5 rad."""
    c, s = math.cos(0.5), math.sin(0.5)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([1.0, 0.05], dtype=torch.float64)) @ rot.T
    return torch.tensor([1.0, -0.5], dtype=torch.float64), cov


def gaussian_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training set's Gaussian (d = 64), the target of the issue's model=gaussian run."""
    from lightning_diff.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    x = dm.train_tensor().reshape(len(dm.train_tensor()), -1).double()
    return x.mean(0), torch.cov(x.T, correction=0)


def floors(cov: torch.Tensor, n: int = N_FLOOR) -> tuple[float, float]:
    """RMS covariance and mean errors (relative to ||C||_F and sqrt(tr C)) of n true samples."""
    tr, fro = float(cov.trace()), float(torch.linalg.norm(cov))
    return math.sqrt((tr**2 + fro**2) / (n - 1)) / fro, 1 / math.sqrt(n)


def errors(mean, cov, true_mean, true_cov) -> tuple[float, float]:
    rel_cov = torch.linalg.norm(cov - true_cov) / torch.linalg.norm(true_cov)
    return float(rel_cov), float(torch.linalg.norm(mean - true_mean) / true_cov.trace().sqrt())


class BasisNoise(SampleGenerators):
    """The sampler's only draw, its prior noise, as the rows 0, e_1, ..., e_d; a second draw (a
    stochastic sampler) is refused, since the output is then no longer this affine image."""

    def __init__(self, dim: int):
        self.dim, self.draws = dim, 0
        self.generators = [None] * (dim + 1)

    def randn(self, shape, device=None, dtype=None):
        self.draws += 1
        if self.draws > 1:
            raise AssertionError("the sampler draws noise after the prior: it is not deterministic")
        return torch.cat([torch.zeros(1, self.dim), torch.eye(self.dim)]).to(torch.float64)


def exact_output(sampler: Sampler, schedule, mean: torch.Tensor, cov: torch.Tensor):
    """Mean and covariance of a deterministic sampler's output, driven by the exact denoiser."""
    dim = mean.numel()
    out, nfe = sampler(GaussianDenoiser(mean, cov), schedule, (dim + 1, dim), BasisNoise(dim))
    out = out.double()
    columns = out[1:] - out[0]  # row j: the image of prior_std * e_j
    return out[0], columns.T @ columns, nfe


def default_config(family: str, sampler: str | None = None):
    overrides = FAMILIES[family] + ([f"sampler={sampler}"] if sampler else [])
    cfg = compose_named("train", overrides)
    schedule = instantiate(cfg.model.sde if "sde" in cfg.model else cfg.model.schedule)
    return instantiate(cfg.sampler), schedule


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_sampler_is_below_the_noise_floor(family):
    sampler, schedule = default_config(family)
    for mean, cov in (gaussian_2d(), gaussian_digits()):
        out_mean, out_cov, nfe = exact_output(sampler, schedule, mean, cov)
        cov_err, mean_err = errors(out_mean, out_cov, mean, cov)
        floor_cov, floor_mean = floors(cov)
        assert cov_err < floor_cov, (family, mean.numel(), cov_err, floor_cov)
        # The mean too (VE's is the largest, 0.013 of the data scale: its N(0, 50^2) prior ignores
        # the data's mean, which the flow shrinks by sqrt(lambda) / 50 but does not remove).
        assert mean_err < floor_mean, (family, mean.numel(), mean_err, floor_mean)
        assert nfe <= 50  # no more evaluations than the old default's 50


def test_the_old_default_ddim_50_misses_the_floor_on_ddpm():
    """The negative control: DDIM (Euler) with 50 leading steps leaves a 7% error, 3x the floor."""
    sampler, schedule = default_config("ddpm", sampler="ddim")
    assert (sampler.num_steps, sampler.spacing) == (50, "leading")
    mean, cov = gaussian_2d()
    out_mean, out_cov, nfe = exact_output(sampler, schedule, mean, cov)
    cov_err, _ = errors(out_mean, out_cov, mean, cov)
    assert nfe == 50 and cov_err > 2.5 * floors(cov)[0]


def test_exact_moments_agree_with_a_large_monte_carlo_run():
    """100000 samples through the ordinary path: their covariance lies within a few of its own
    Monte Carlo floors (0.0046) of the exact one, and below the n = 4000 floor."""
    sampler, schedule = default_config("ddpm")
    mean, cov = gaussian_2d()
    exact_mean, exact_cov, _ = exact_output(sampler, schedule, mean, cov)
    n = 100_000
    x, _ = sampler(GaussianDenoiser(mean, cov), schedule, (n, 2), torch.Generator().manual_seed(0))
    x = x.double()
    mc_floor = floors(cov, n)[0]
    gap = float(torch.linalg.norm(torch.cov(x.T) - exact_cov) / torch.linalg.norm(cov))
    assert gap < 3 * mc_floor
    assert float(torch.linalg.norm(x.mean(0) - exact_mean) / cov.trace().sqrt()) < 3 / math.sqrt(n)
    assert errors(x.mean(0), torch.cov(x.T), mean, cov)[0] < floors(cov)[0]


# ---- the continuous spacings the default uses --------------------------------------------------


@pytest.mark.parametrize("spacing", ["karras", "vp"])
def test_discrete_schedule_continuous_spacings_span_its_sigma_range(spacing):
    schedule = DiscreteSchedule()
    sig = schedule.sampling_sigmas(25, spacing)
    assert sig.shape == (26,) and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    ends = torch.tensor([schedule.sigma_max, schedule.sigma_min], dtype=torch.float64)
    torch.testing.assert_close(sig[[0, -2]], ends, rtol=1e-12, atol=0)
    # Any step count, not only divisors of T or counts up to T: the levels are continuous.
    assert schedule.sampling_sigmas(1500, spacing).shape == (1501,)
    torch.testing.assert_close(
        schedule.sampling_sigmas(1, spacing), torch.tensor([schedule.sigma_max, 0.0]).double()
    )
    with pytest.raises(ConfigError):
        schedule.sampling_sigmas(0, spacing)


def test_vp_spacing_is_the_vp_sdes_uniform_grid_and_near_ddpms_linspace():
    sde = VPSDE()
    torch.testing.assert_close(
        sde.sampling_sigmas(25, "vp"), sde.sampling_sigmas(25, "uniform"), rtol=1e-6, atol=0
    )
    # DDPM's linear schedule is the VP SDE's discretisation: its evenly spaced integer timesteps
    # carry nearly the same levels (within 1.1%).
    schedule = DiscreteSchedule()
    vp, linspace = schedule.sampling_sigmas(25, "vp")[:-1], schedule.sampling_sigmas(25, "linspace")[:-1]
    assert float(((vp - linspace) / linspace).abs().max()) < 0.011
    with pytest.raises(ConfigError, match="unknown timestep spacing"):
        schedule.sampling_sigmas(10, "quadratic")
