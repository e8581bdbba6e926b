"""How a network becomes a denoiser, and what it is trained on: preconditioning, targets, loss weights.

Every neural family writes its denoiser in one form (Karras et al. 2022, arXiv 2206.00364, eq. 7
and Table 1), in the interface's coordinates ``x = x0 + sigma n``::

    D(x, sigma) = mu + c_skip(sigma) (x - mu) + c_out(sigma) F(c_in(sigma) (x - mu), c_noise)

``F`` is the network, ``mu`` a fixed offset (the training mean for ``edm``, else 0) and ``c_noise``
the family's own time conditioning (DDPM's timestep, ``999 t`` for a score SDE). The
*parameterisation* (``prediction``) fixes the three coefficients:

- ``edm`` (the default): ``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d / sqrt(sigma^2 +
  s_d^2)``, ``c_in = 1 / sqrt(sigma^2 + s_d^2)``, with ``s_d`` the data's standard deviation. The
  network's input and its target have unit variance at every noise level, and its error reaches
  ``D`` multiplied by at most ``s_d``.
- ``eps`` (Ho et al. 2020): ``c_skip = 1``, ``c_out = -sigma``, ``c_in = alpha``, the family's signal
  coefficient (``z = alpha x``; ``1 / sqrt(1 + sigma^2)`` for DDPM). An error of the predicted noise
  reaches ``D`` multiplied by ``sigma``: 157 at the top of DDPM's linear schedule, 50 for the VE SDE.
  Deterministic samplers start in the tails of the network's input, where it extrapolates, and
  carry that error into the samples as far outliers (measured in bench/vector_matrix.py).
- ``x0``: ``c_skip = 0``, ``c_out = 1``, ``c_in = alpha``.
- ``v`` (Salimans & Ho 2022, arXiv 2202.00512, eq. 12, sign as there): ``c_skip = 1 / (1 + sigma^2)``,
  ``c_out = -sigma / sqrt(1 + sigma^2)``, ``c_in = 1 / sqrt(1 + sigma^2)``: ``edm`` with ``s_d = 1``,
  the network's output negated, and no offset.

The network is trained on its own target ``F* = (x0 - mu - c_skip (x - mu)) / c_out`` (for ``eps``
the noise, for ``x0`` the data, for ``v`` the velocity), so a loss weight ``w(sigma)`` on the
denoising error ``||D - x0||^2`` is ``w c_out^2`` on ``||F - F*||^2``. The weightings, written as
that ``w``:

- ``simple``: ``1 / c_out^2``, unit weight on the network's target: DDPM's simple loss (Ho et al.
  2020, eq. 14) in each parameterisation, and EDM's ``lambda(sigma)`` for ``edm``.
- ``min_snr``: ``min(SNR, gamma)`` with ``SNR = 1 / sigma^2`` (Hang et al. 2023, arXiv 2303.09556).
- ``std2``: ``1 / sigma^2``, denoising score matching with ``lambda = std_t^2`` (Song et al. 2021,
  eq. 7; with ``eps`` it is the noise MSE, as ``simple``).
- ``likelihood``: ``g(t)^2 / (sigma^2 std_t^2)``, i.e. ``lambda = g^2`` (Song, Durkan, Murray & Ermon
  2021, arXiv 2101.09258, Thm. 1); score SDEs only.

The noise levels are each family's own: DDPM draws an integer timestep uniformly
(:class:`DiscreteObjective`), a score SDE a time ``t ~ U(train_eps, T)`` (:class:`ContinuousObjective`).
Nothing here imports Lightning; the LightningModules only choose the parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_diff.diffusion.random import rand, randint, randn
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.diffusion.sdes import SDE
from lightning_diff.diffusion.utils import append_dims
from lightning_diff.errors import ConfigError

if TYPE_CHECKING:
    from lightning_diff.diffusion.denoisers import PreconditionedDenoiser

PREDICTIONS = ("edm", "eps", "x0", "v")
DISCRETE_WEIGHTINGS = ("simple", "min_snr")
CONTINUOUS_WEIGHTINGS = ("simple", "std2", "likelihood", "min_snr")


def sde_noise_conditioning(t: Tensor) -> Tensor:
    """A score SDE network's time input: ``999 t``, what the reference code feeds its VP and sub-VP
    nets (kept for VE too, where ``t`` is affine in ``log sigma``)."""
    return 999 * t


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"model.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
    return prediction


class Preconditioning:
    """The coefficients ``c_skip, c_out, c_in`` of one parameterisation, and the offset ``mu``.

    Args:
        prediction: ``edm``, ``eps``, ``x0`` or ``v`` (see the module docstring).
        sigma_data: ``s_d`` of ``edm`` (ignored otherwise).
        mean: the offset ``mu`` of ``edm``, shaped like one sample, or None for 0 (ignored otherwise).
    """

    def __init__(self, prediction: str = "eps", sigma_data: float = 1.0, mean: Tensor | None = None):
        self.prediction = check_prediction(prediction)
        if prediction == "edm" and not sigma_data > 0:
            raise ConfigError(f"model.sigma_data={sigma_data} must be positive")
        self.sigma_data = float(sigma_data)
        self.mean = mean if prediction == "edm" else None
        self._mean_cast: dict[tuple, Tensor] = {}

    def coefficients(self, sigma: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` in float64 for per-sample ``sigma`` and signal coefficient ``alpha``."""
        sigma = sigma.to(torch.float64)
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, alpha.to(torch.float64)
        if self.prediction == "x0":
            return torch.zeros_like(sigma), torch.ones_like(sigma), alpha.to(torch.float64)
        sd = 1.0 if self.prediction == "v" else self.sigma_data
        root = (sigma**2 + sd**2).sqrt()
        c_out = sigma * sd / root
        return sd**2 / root**2, -c_out if self.prediction == "v" else c_out, 1 / root

    def target_coefficients(self, sigma: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)`` with ``F* = a (x0 - mu) + b n`` for ``x = x0 + sigma n``, in float64.

        From ``F* = ((1 - c_skip)(x0 - mu) - c_skip sigma n) / c_out``, written out per
        parameterisation so that each target is exact (the noise for ``eps``, the data for ``x0``).
        """
        sigma = sigma.to(torch.float64)
        if self.prediction == "eps":
            return torch.zeros_like(sigma), torch.ones_like(sigma)
        if self.prediction == "x0":
            return torch.ones_like(sigma), torch.zeros_like(sigma)
        sd = 1.0 if self.prediction == "v" else self.sigma_data
        root = (sigma**2 + sd**2).sqrt()
        a, b = sigma / (sd * root), -sd / root
        return (-a, -b) if self.prediction == "v" else (a, b)

    def offset(self, x: Tensor) -> Tensor | None:
        """``mu`` in ``x``'s dtype and device (cached), or None when there is none."""
        if self.mean is None:
            return None
        key = (x.dtype, x.device)
        if key not in self._mean_cast:
            self._mean_cast[key] = self.mean.to(device=x.device, dtype=x.dtype)
        return self._mean_cast[key]


def data_statistics(train: Tensor) -> tuple[Tensor, float]:
    """The per-coordinate training mean (float64, shaped like one sample) and ``s_d``, the root mean
    square of the centred data over samples and coordinates (EDM's sigma_data)."""
    flat = train.to(torch.float64)
    mean = flat.mean(0)
    sd = float((flat - mean).pow(2).mean().sqrt())
    if not sd > 0:
        raise ConfigError("the training data are constant: no data scale to precondition with")
    return mean, sd


@dataclass
class NoiseLevels:
    """One draw of training noise levels: per-sample ``sigma``, signal coefficient ``alpha``, the
    network's conditioning ``c_noise`` and the weight on the denoising error (None: ``simple``)."""

    sigma: Tensor
    alpha: Tensor
    c_noise: Tensor
    weight: Tensor | None


def denoising_loss(
    denoiser: PreconditionedDenoiser, x0: Tensor, noise: Tensor, levels: NoiseLevels
) -> Tensor:
    """Per-sample ``w(sigma) ||D(x0 + sigma n, sigma) - x0||^2`` averaged over dimensions, computed as
    ``w c_out^2 ||F - F*||^2`` so that no coefficient divides by a small number."""
    pre = denoiser.preconditioning
    _, c_out, c_in = pre.coefficients(levels.sigma, levels.alpha)
    a, b = pre.target_coefficients(levels.sigma, levels.alpha)
    mu = pre.offset(x0)
    centred = x0 if mu is None else x0 - mu

    def dims(v: Tensor) -> Tensor:
        return append_dims(v.to(x0.dtype), x0.ndim)

    # c_in (x - mu) with x = x0 + sigma n, the coefficient of n taken in float64.
    net_input = dims(c_in) * centred + dims(c_in * levels.sigma.to(torch.float64)) * noise
    target = dims(a) * centred + dims(b) * noise
    out = denoiser.net(net_input, levels.c_noise.to(x0.dtype))
    mse = (out - target).pow(2).flatten(1).mean(1)
    if levels.weight is None:
        return mse
    return (levels.weight * c_out**2).to(mse.dtype) * mse


class DiscreteObjective:
    """DDPM's objective (Ho et al. 2020, Algorithm 1): ``t`` uniform over the ``T`` timesteps.

    Args:
        schedule: the :class:`DiscreteSchedule`.
        weighting: ``simple`` or ``min_snr`` (cap ``min_snr_gamma``).
    """

    def __init__(self, schedule: DiscreteSchedule, weighting: str = "simple", min_snr_gamma: float = 5.0):
        if weighting not in DISCRETE_WEIGHTINGS:
            raise ConfigError(
                f"model.loss_weighting={weighting!r} is not one of {', '.join(DISCRETE_WEIGHTINGS)}"
            )
        self.schedule, self.weighting, self.min_snr_gamma = schedule, weighting, min_snr_gamma

    def noise_levels(self, batch_size: int, generator, device) -> NoiseLevels:
        t = randint(self.schedule.num_timesteps, (batch_size,), generator, device=device)
        ab = self.schedule.alphas_cumprod.to(device)[t]
        sigma = ((1 - ab) / ab).sqrt()
        weight = None
        if self.weighting == "min_snr":
            weight = (ab / (1 - ab)).clamp(max=self.min_snr_gamma)
        return NoiseLevels(sigma, ab.sqrt(), t.to(torch.float64), weight)

    def __call__(self, denoiser: PreconditionedDenoiser, x0: Tensor, generator=None) -> Tensor:
        levels = self.noise_levels(x0.shape[0], generator, x0.device)
        noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        return denoising_loss(denoiser, x0, noise, levels)


class ContinuousObjective:
    """Denoising score matching of a score SDE (Song et al. 2021, eq. 7): ``t ~ U(train_eps, T)``.

    Args:
        sde: the forward SDE.
        weighting: ``simple``, ``std2``, ``likelihood`` or ``min_snr`` (cap ``min_snr_gamma``).
    """

    def __init__(self, sde: SDE, weighting: str = "simple", min_snr_gamma: float = 5.0):
        if weighting not in CONTINUOUS_WEIGHTINGS:
            raise ConfigError(
                f"model.weighting={weighting!r} is not one of {', '.join(CONTINUOUS_WEIGHTINGS)}"
            )
        self.sde, self.weighting, self.min_snr_gamma = sde, weighting, min_snr_gamma

    def noise_levels(self, batch_size: int, generator, device, dtype) -> NoiseLevels:
        u = rand((batch_size,), generator, device=device, dtype=dtype)
        t = self.sde.train_eps + (self.sde.T - self.sde.train_eps) * u.to(torch.float64)
        alpha, std = self.sde.marginal(t)
        sigma = self.sde.sigma(t)
        weight = None
        if self.weighting == "std2":
            weight = sigma**-2
        elif self.weighting == "likelihood":
            weight = self.sde.diffusion(t) ** 2 / (sigma**2 * std**2)
        elif self.weighting == "min_snr":
            weight = (sigma**-2).clamp(max=self.min_snr_gamma)
        return NoiseLevels(sigma, alpha, sde_noise_conditioning(t), weight)

    def __call__(self, denoiser: PreconditionedDenoiser, x0: Tensor, generator=None) -> Tensor:
        levels = self.noise_levels(x0.shape[0], generator, x0.device, x0.dtype)
        noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        return denoising_loss(denoiser, x0, noise, levels)
