"""The one interface every model family answers (Karras et al. 2022, arXiv 2206.00364, Sec. 2).

Write the noisy variable as ``x = x0 + sigma * n``. A :class:`Denoiser` maps ``(x, sigma)`` to
``D(x, sigma) ~ E[x0 | x]``; the score and the noise prediction follow by Tweedie's formula:
``score = (D - x) / sigma^2`` and ``eps = (x - D) / sigma``. Samplers, teleportation and metrics
take only this interface, so each is written once for every family.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.diffusion.sdes import SDE
from lightning_diff.diffusion.utils import append_dims, as_sigma_batch
from lightning_diff.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v")


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


class VPDenoiser(Denoiser):
    """Adapts a discrete-time variance-preserving network (DDPM) to the denoiser interface.

    The network sees ``z = x / sqrt(1 + sigma^2)`` (so ``alpha_bar = 1 / (1 + sigma^2)``) and the
    fractional timestep of ``sigma`` on its schedule, and predicts ``eps``, ``x0`` or
    ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0`` (Salimans & Ho 2022, eq. 12 of
    arXiv 2202.00512).
    """

    def __init__(self, net: nn.Module, schedule: DiscreteSchedule, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {prediction!r}: use one of {', '.join(PREDICTIONS)}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma_batch(sigma, x)
        c_noise = self.schedule.sigma_to_t(sigma).to(x.dtype)
        s64 = sigma.to(torch.float64)
        sqrt_ab = (1 / (1 + s64**2)).sqrt()
        sqrt_1mab = (s64**2 / (1 + s64**2)).sqrt()
        sqrt_ab, sqrt_1mab = (append_dims(v.to(x.dtype), x.ndim) for v in (sqrt_ab, sqrt_1mab))
        z = x * sqrt_ab
        out = self.net(z, c_noise)
        if self.prediction == "eps":
            return x - append_dims(sigma, x.ndim) * out
        if self.prediction == "x0":
            return out
        return sqrt_ab * z - sqrt_1mab * out


class SDEDenoiser(Denoiser):
    """Adapts a continuous-time score-SDE network (Song et al. 2021, arXiv 2011.13456) to the interface.

    The network works in the SDE's own coordinates: at ``t = sde.t_of_sigma(sigma)`` it sees
    ``z = alpha_t x`` and ``c_noise = 999 t``, and predicts the noise ``n`` of
    ``z = alpha_t x0 + std_t n``, so its score is ``score_z = -eps / std_t`` (the reference code's
    ``score = -model / std``). The noise is the same ``n`` as in ``x = x0 + sigma n``, hence
    ``D(x, sigma) = x - sigma eps``.

    ``c_noise = 999 t`` is what the reference code feeds its VP and sub-VP nets. For VE we keep it too
    rather than ``log sigma``: ``t`` is affine in ``log sigma`` there, so ``999 t`` carries the same
    information, rescaled to the range the sinusoidal embedding is built for. The net itself stays
    agnostic of the choice.
    """

    def __init__(self, net: nn.Module, sde: SDE):
        super().__init__()
        self.net = net
        self.sde = sde

    @staticmethod
    def c_noise(t: Tensor) -> Tensor:
        """The network's noise conditioning at SDE time ``t``."""
        return 999 * t

    def eps_z(self, z: Tensor, t: Tensor) -> Tensor:
        """The network's noise prediction at time ``t`` (B,) in the SDE's coordinates (used by the loss)."""
        return self.net(z, self.c_noise(t.to(torch.float64)).to(z.dtype))

    def score_z(self, z: Tensor, t: Tensor | float) -> Tensor:
        """``grad_z log p_t(z) ~ -eps / std_t``, the score the reverse SDE of ``sde`` takes."""
        t = torch.as_tensor(t, device=z.device).to(torch.float64).expand(z.shape[0])
        _, std = self.sde.marginal(t)
        return -self.eps_z(z, t) / append_dims(std.to(z.dtype), z.ndim)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma_batch(sigma, x)
        t = self.sde.t_of_sigma(sigma.to(torch.float64))
        alpha, _ = self.sde.marginal(t)
        eps = self.eps_z(x * append_dims(alpha.to(x.dtype), x.ndim), t)
        return x - append_dims(sigma, x.ndim) * eps


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

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma_batch(sigma, x).to(torch.float64)
        flat = x.reshape(x.shape[0], -1).to(torch.float64) - self.mean
        coeff = flat @ self.eigvecs
        gain = self.eigvals / (self.eigvals + sigma[:, None] ** 2)
        out = self.mean + (coeff * gain) @ self.eigvecs.T
        return out.reshape(x.shape).to(x.dtype)
