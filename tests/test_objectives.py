"""Preconditioning and training objectives against formulas written out here, not taken from the code.

Karras et al. 2022 (arXiv 2206.00364), Table 1, for ``edm``; Ho et al. 2020 and Salimans & Ho 2022
for DDPM's ``eps``, ``x0`` and ``v``. Each test states the expected value from the papers' formulas
and compares it with what the public denoiser and loss compute.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_diff.diffusion import VESDE, VPSDE, DiscreteSchedule, SDEDenoiser, SubVPSDE, VPDenoiser
from lightning_diff.diffusion.objectives import data_statistics
from lightning_diff.errors import ConfigError
from lightning_diff.models import DDPM, ScoreSDE
from lightning_diff.nets import MLP

PREDICTIONS = ["edm", "eps", "x0", "v"]
SIGMA_DATA = 0.7
MEAN = torch.tensor([3.0, -2.0], dtype=torch.float64)


def signal_coefficient(family: str, sigma: torch.Tensor) -> torch.Tensor:
    """alpha of z = alpha x in each family's own coordinates."""
    if family == "ddpm":
        return 1 / (1 + sigma**2).sqrt()
    sde = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}[family]
    return sde.marginal(sde.t_of_sigma(sigma))[0]


def expected_input_and_target(prediction, family, x0, noise, sigma):
    """What the network should see and predict, from the papers' definitions."""
    s = sigma[:, None]
    x = x0 + s * noise
    if prediction == "edm":
        root = (s**2 + SIGMA_DATA**2).sqrt()
        c_skip, c_out = SIGMA_DATA**2 / root**2, s * SIGMA_DATA / root
        return (x - MEAN) / root, (x0 - MEAN - c_skip * (x - MEAN)) / c_out
    if prediction == "v":
        ab = 1 / (1 + s**2)
        return x * ab.sqrt(), ab.sqrt() * noise - (1 - ab).sqrt() * x0
    alpha = signal_coefficient(family, sigma)[:, None]
    return alpha * x, noise if prediction == "eps" else x0


class Oracle(torch.nn.Module):
    """Returns a fixed output and records its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, inp, c_noise):
        self.seen = inp
        return self.out


def adapter(family, net, prediction):
    if family == "ddpm":
        return VPDenoiser(net, DiscreteSchedule(), prediction, SIGMA_DATA, MEAN)
    sde = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}[family]
    return SDEDenoiser(net, sde, prediction, SIGMA_DATA, MEAN)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("family", ["ddpm", "vp", "subvp", "ve"])
def test_a_network_that_predicts_its_exact_target_denoises_exactly(family, prediction):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 2, generator=gen, dtype=torch.float64) + MEAN
    noise = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    sigma = torch.logspace(-1.5, 1.5, 16, dtype=torch.float64)
    expected_in, target = expected_input_and_target(prediction, family, x0, noise, sigma)
    net = Oracle(target)
    den = adapter(family, net, prediction)
    torch.testing.assert_close(den(x0 + sigma[:, None] * noise, sigma), x0)
    torch.testing.assert_close(net.seen, expected_in)


@pytest.mark.parametrize("sigma", [0.01, 1.0, 80.0])
def test_edm_network_input_and_target_have_unit_variance_at_every_noise_level(sigma):
    """The point of the preconditioning (Karras et al. 2022, Sec. 5): with sigma_data fitted to data
    far from the origin, the net's input and its training target have unit second moment."""
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(100_000, 2, generator=gen) * torch.tensor([2.0, 0.3]) + torch.tensor([5.0, -4.0])
    net = Oracle(torch.zeros(()))
    model = DDPM(net, DiscreteSchedule())
    model.fit_data(data)
    mean, scale = data_statistics(data)
    assert scale == pytest.approx(math.sqrt((4 + 0.09) / 2), rel=0.01)
    torch.testing.assert_close(
        model.data_mean, torch.tensor([5.0, -4.0], dtype=torch.float64), atol=0.02, rtol=0
    )
    den = model.make_denoiser(net)
    x = data + sigma * torch.randn(data.shape, generator=gen)
    den(x, torch.full((len(x),), sigma))
    assert net.seen.pow(2).mean().item() == pytest.approx(1.0, rel=0.03)
    # With a net that outputs 0 the simple loss is the mean square of the target.
    ddpm = DDPM(Oracle(torch.zeros(())), DiscreteSchedule())
    ddpm.fit_data(data)
    loss = ddpm.loss(data[:20000], torch.Generator().manual_seed(2))
    assert loss.mean().item() == pytest.approx(1.0, rel=0.05)


def expected_weight(prediction, weighting, sigma, gamma=5.0):
    """w(sigma) on ||D - x0||^2: 1 / c_out^2 for simple, min(SNR, gamma) for min_snr."""
    if weighting == "min_snr":
        return (sigma**-2).clamp(max=gamma)
    c_out = {
        "edm": sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt(),
        "eps": sigma,
        "x0": torch.ones_like(sigma),
        "v": sigma / (1 + sigma**2).sqrt(),
    }[prediction]
    return c_out**-2


@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_loss_is_the_weighted_denoising_error(prediction, weighting):
    """Ho et al. 2020, Algorithm 1: t ~ U{0..T-1}, then the noise; loss = w(sigma_t) ||D - x0||^2 / d."""
    torch.manual_seed(0)
    net = MLP(2, hidden_dim=16, num_layers=1)
    torch.nn.init.normal_(net.output_proj.weight)
    model = DDPM(net, DiscreteSchedule(), prediction, weighting, sigma_data=SIGMA_DATA)
    x0 = torch.randn(64, 2)
    loss = model.loss(x0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (64,), generator=gen)
    noise = torch.randn(64, 2, generator=gen)
    ab = DiscreteSchedule().alphas_cumprod[t]
    sigma = ((1 - ab) / ab).sqrt()
    den = model.denoiser(use_ema=False)
    error = (den(x0 + sigma[:, None].float() * noise, sigma.float()).double() - x0.double()).pow(2).mean(1)
    torch.testing.assert_close(
        loss.double(), expected_weight(prediction, weighting, sigma) * error, rtol=2e-3, atol=1e-7
    )


def test_eps_loss_is_the_noise_mse_of_ho_et_al():
    """The simple eps loss is ||eps - eps_theta(sqrt(ab) x0 + sqrt(1 - ab) eps, t)||^2, net called with t."""
    torch.manual_seed(0)
    net = MLP(2, hidden_dim=16, num_layers=1)
    torch.nn.init.normal_(net.output_proj.weight)
    model = DDPM(net, DiscreteSchedule(), "eps")
    x0 = torch.randn(32, 2)
    loss = model.loss(x0, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (32,), generator=gen)
    noise = torch.randn(32, 2, generator=gen)
    ab = DiscreteSchedule().alphas_cumprod[t].float()[:, None]
    ref = (net(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t.float()) - noise).pow(2).mean(1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_edm_without_data_statistics_is_a_one_line_config_error():
    model = ScoreSDE(MLP(2, hidden_dim=8, num_layers=1))
    with pytest.raises(ConfigError, match="model.sigma_data"):
        model.loss(torch.randn(4, 2))
    with pytest.raises(ConfigError, match="model.prediction"):
        DDPM(MLP(2), prediction="score")
    with pytest.raises(ConfigError, match="sigma_data"):
        DDPM(MLP(2), sigma_data=-1.0)


def test_preconditioning_statistics_travel_in_the_checkpointed_state():
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)) * 3 + 1
    model = ScoreSDE(MLP(2, hidden_dim=8, num_layers=1))
    model.fit_data(data)
    fresh = ScoreSDE(MLP(2, hidden_dim=8, num_layers=1))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.data_mean, model.data_mean)
    torch.testing.assert_close(fresh.data_scale, model.data_scale)
    x, sigma = torch.randn(5, 2), torch.full((5,), 2.0)
    torch.testing.assert_close(fresh.denoiser()(x, sigma), model.denoiser()(x, sigma))
