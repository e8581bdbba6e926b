"""The one interface every model family answers (Karras et al. 2022, arXiv 2206.00364, Sec. 2).

Write the noisy variable as ``x = x0 + sigma * n``. A :class:`Denoiser` maps ``(x, sigma)`` to
``D(x, sigma) ~ E[x0 | x]``; the score and the noise prediction follow by Tweedie's formula:
``score = (D - x) / sigma^2`` and ``eps = (x - D) / sigma``. Samplers, teleportation and metrics
take only this interface, so each is written once for every family.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.objectives import Preconditioning, sde_noise_conditioning
from lightning_diff.diffusion.random import normal_rows
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.diffusion.sdes import SDE
from lightning_diff.diffusion.utils import append_dims, as_sigma_batch


class Denoiser(nn.Module):
    """Base class: subclasses implement ``forward(x, sigma) -> D(x, sigma)``; ``sigma`` is (B,) or scalar."""

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (Tweedie)."""
        s = append_dims(as_sigma_batch(sigma, x), x.ndim)
        return (self(x, as_sigma_batch(sigma, x)) - x) / s**2

    def eps(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Noise estimate ``(x - D(x, sigma)) / sigma``."""
        s = append_dims(as_sigma_batch(sigma, x), x.ndim)
        return (x - self(x, as_sigma_batch(sigma, x))) / s


class ClampedDenoiser(Denoiser):
    """Clamps another denoiser's estimate to the data range (Ho et al. 2020 clip x0 to [-1, 1] for images).

    Samplers derive the noise estimate from ``D``, so it stays consistent with the clamped value.
    """

    def __init__(self, inner: Denoiser, low: float = -1.0, high: float = 1.0):
        super().__init__()
        self.inner, self.low, self.high = inner, low, high

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.inner(x, sigma).clamp(self.low, self.high)


class PreconditionedDenoiser(Denoiser):
    """A network as a denoiser through a :class:`~lightning_diff.diffusion.objectives.Preconditioning`:
    ``D = mu + c_skip (x - mu) + c_out F(c_in (x - mu), c_noise)`` (Karras et al. 2022, eq. 7).

    Subclasses give the family's coordinates: :meth:`coordinates` maps ``sigma`` to the signal
    coefficient ``alpha`` of ``z = alpha x`` (what an ``eps``/``x0`` network sees) and the network's
    time conditioning ``c_noise``.
    """

    def __init__(
        self, net: nn.Module, prediction: str = "eps", sigma_data: float = 1.0, mean: Tensor | None = None
    ):
        super().__init__()
        self.net = net
        self.prediction = prediction
        self.preconditioning = Preconditioning(prediction, sigma_data, mean)

    def coordinates(self, sigma: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(alpha, c_noise)`` for per-sample ``sigma`` (float64)."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma_batch(sigma, x)
        alpha, c_noise = self.coordinates(sigma.to(torch.float64))
        c_skip, c_out, c_in = (
            append_dims(c.to(x.dtype), x.ndim) for c in self.preconditioning.coefficients(sigma, alpha)
        )
        mu = self.preconditioning.offset(x)
        centred = x if mu is None else x - mu
        out = c_skip * centred + c_out * self.net(c_in * centred, c_noise.to(x.dtype))
        return out if mu is None else out + mu


class VPDenoiser(PreconditionedDenoiser):
    """A discrete-time variance-preserving network (DDPM) as a denoiser.

    ``alpha_bar = 1 / (1 + sigma^2)``; the network is conditioned on the fractional timestep of
    ``sigma`` on its schedule. With ``eps``, ``x0`` or ``v`` it sees ``z = sqrt(alpha_bar) x`` and
    predicts the noise, the data or ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0`` (Salimans &
    Ho 2022, eq. 12), exactly as a DDPM of diffusers' schedulers; with ``edm`` it is preconditioned as
    in Karras et al. 2022 (``sigma_data``, ``mean``: see ``Preconditioning``).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: DiscreteSchedule,
        prediction: str = "eps",
        sigma_data: float = 1.0,
        mean=None,
    ):
        super().__init__(net, prediction, sigma_data, mean)
        self.schedule = schedule

    def coordinates(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return (1 + sigma**2).rsqrt(), self.schedule.sigma_to_t(sigma)


class SDEDenoiser(PreconditionedDenoiser):
    """A continuous-time score-SDE network (Song et al. 2021, arXiv 2011.13456) as a denoiser.

    At ``t = sde.t_of_sigma(sigma)`` the network is conditioned on ``c_noise = 999 t`` (what the
    reference code feeds its VP and sub-VP nets; for VE ``t`` is affine in ``log sigma``, so it
    carries the same information, rescaled to the range the sinusoidal embedding is built for).
    With ``eps`` (the paper's parameterisation) it sees ``z = alpha_t x`` and predicts the noise
    ``n`` of ``z = alpha_t x0 + std_t n``, the same ``n`` as in ``x = x0 + sigma n``, so its score is
    the reference code's ``score = -model / std``; ``edm`` is the default of ``model=score_sde``.
    """

    def __init__(self, net: nn.Module, sde: SDE, prediction: str = "eps", sigma_data: float = 1.0, mean=None):
        super().__init__(net, prediction, sigma_data, mean)
        self.sde = sde

    def coordinates(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        t = self.sde.t_of_sigma(sigma)
        return self.sde.marginal(t)[0], sde_noise_conditioning(t)

    def score_z(self, z: Tensor, t: Tensor | float) -> Tensor:
        """``grad_z log p_t(z)``, the score the reverse SDE of ``sde`` takes: the interface's score at
        ``x = z / alpha_t`` divided by ``alpha_t``."""
        t = torch.as_tensor(t, device=z.device).to(torch.float64).expand(z.shape[0])
        alpha, std = self.sde.marginal(t)
        x = z / append_dims(alpha.to(z.dtype), z.ndim)
        return self.score(x, (std / alpha).to(z.dtype)) / append_dims(alpha.to(z.dtype), z.ndim)


class GaussianDenoiser(Denoiser):
    """Closed-form denoiser of Gaussian data N(mu, Sigma).

    With ``Sigma = U diag(lambda) U^T``,
    ``D(x, sigma) = mu + U diag(lambda / (lambda + sigma^2)) U^T (x - mu)``
    (Wang & Vastola 2024, arXiv 2412.09726, Sec. 3). Zero eigenvalues (a low-rank covariance, as for
    images with fewer samples than pixels) simply give zero gain. Data of any shape are flattened.
    """

    def __init__(self, mean: Tensor, cov: Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        dim = mean.numel()
        if cov.shape != (dim, dim):
            raise ValueError(f"covariance of shape {tuple(cov.shape)} does not match a mean of {dim} entries")
        lam, U = torch.linalg.eigh((cov + cov.T) / 2)
        self.register_buffer("mean", mean.reshape(-1))
        self.register_buffer("eigvals", lam.clamp(min=0))
        self.register_buffer("eigvecs", U)

    @classmethod
    def from_data(cls, data: Tensor) -> GaussianDenoiser:
        """Fit mean and (maximum-likelihood) covariance to samples of any per-sample shape."""
        flat = data.reshape(data.shape[0], -1).to(torch.float64)
        mean = flat.mean(0)
        centred = flat - mean
        return cls(mean, centred.T @ centred / flat.shape[0])

    @torch.no_grad()
    def sample_exact(self, shape: tuple[int, ...], generator=None, device=None) -> Tensor:
        """Draws of ``N(mu, Sigma)`` itself: ``mu + U diag(sqrt(lambda)) z`` (``sampler=exact``)."""
        z = normal_rows(shape[0], self.mean.numel() + 1, generator, self.mean.device)[:, 1:]
        x = self.mean + (z * self.eigvals.sqrt()) @ self.eigvecs.T
        return x.reshape(shape).to(device or self.mean.device)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma_batch(sigma, x).to(torch.float64)
        flat = x.reshape(x.shape[0], -1).to(torch.float64) - self.mean
        coeff = flat @ self.eigvecs
        gain = self.eigvals / (self.eigvals + sigma[:, None] ** 2)
        out = self.mean + (coeff * gain) @ self.eigvecs.T
        return out.reshape(x.shape).to(x.dtype)
