"""Discrete-time noise schedules of DDPM (Ho et al. 2020, arXiv 2006.11239) in both conventions.

Time indexing: ``t = 0 .. T-1`` with ``t = 0`` the least noisy step, as in diffusers,
improved-diffusion and score_sde (the DDPM paper counts ``1 .. T``; its ``t = 1`` is our ``t = 0``).

A variance-preserving step sees ``z_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``. Dividing
by ``sqrt(alpha_bar_t)`` gives the variance-exploding form ``x = x0 + sigma_t eps`` with
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``, which is what samplers and metrics see.
Constants are computed in float64 and stored as buffers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from lightning_diff.diffusion.sdes import karras_sigmas, vp_sigmas
from lightning_diff.errors import ConfigError

# Integer timesteps of the schedule (``timesteps``), then continuous levels in its sigma range.
SPACINGS = ("leading", "trailing", "linspace", "uniform")
CONTINUOUS_SPACINGS = ("karras", "vp")


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 over T = 1000."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    Betas are ``1 - alpha_bar(t+1) / alpha_bar(t)`` clipped at ``max_beta`` to avoid the singularity
    at the end of the schedule.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


class DiscreteSchedule(nn.Module):
    """A DDPM noise schedule with the conversions between timestep, alpha_bar and sigma.

    Args:
        kind: ``"linear"`` or ``"cosine"``.
        num_timesteps: T, the number of training noise levels.
        beta_start, beta_end: the linear schedule's end points.
        cosine_s, max_beta: the cosine schedule's offset and beta clip.
    """

    def __init__(
        self,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ):
        super().__init__()
        if kind == "linear":
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(num_timesteps, cosine_s, max_beta)
        else:
            raise ConfigError(f"unknown schedule kind {kind!r}: use model.schedule.kind=linear or cosine")
        self.kind = kind
        self.num_timesteps = num_timesteps
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt(), persistent=False)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of ``sigma`` by linear interpolation of log sigma (exact on the grid).

        Discrete models are trained on integer t only; between grid points the interpolated t is the
        natural continuous extension (and what lets continuous-time samplers drive a DDPM net).
        """
        log_sigma = sigma.to(torch.float64).clamp(self.sigma_min, self.sigma_max).log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).to(torch.float64) + w

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_to_t`: log-linear interpolation of sigma at fractional t."""
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def timesteps(self, num_steps: int, spacing: str = "leading") -> Tensor:
        """Descending integer timesteps for a sampler of ``num_steps`` steps.

        ``leading``: ``0, k, 2k, ...`` with ``k = T // num_steps`` (DDIM's original choice);
        ``trailing``: ends exactly at ``T - 1`` (Lin et al. 2023, Table 2); ``linspace``: evenly
        rounded over ``[0, T - 1]`` (``uniform`` is an alias, the name the score-SDE samplers use).
        """
        T = self.num_timesteps
        if not 1 <= num_steps <= T:
            raise ConfigError(f"num_steps={num_steps} must be in [1, {T}] for a {T}-step schedule")
        if spacing == "leading":
            ts = np.arange(num_steps) * (T // num_steps)
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64)[::-1] - 1
        elif spacing in ("linspace", "uniform"):
            ts = np.linspace(0, T - 1, num_steps).round()
        else:
            choices = ", ".join(SPACINGS + CONTINUOUS_SPACINGS)
            raise ConfigError(f"unknown timestep spacing {spacing!r}: use one of {choices}")
        return torch.as_tensor(ts[::-1].copy(), dtype=torch.long)

    def sampling_sigmas(self, num_steps: int, spacing: str = "leading") -> Tensor:
        """The sampler's noise levels, descending, then a final 0.

        ``leading``, ``trailing``, ``linspace`` (``uniform``): the sigmas of :meth:`timesteps`, the
        trained levels. ``karras`` (Karras et al. 2022 eq. 5, ``rho = 7``) and ``vp``
        (:func:`~lightning_diff.diffusion.sdes.vp_sigmas`, uniform in the VP SDE's time; for the
        linear schedule within 1.1% of ``linspace``'s levels): ``num_steps`` continuous levels from
        ``sigma_max`` to ``sigma_min``, between the trained ones; the DDPM denoiser takes the
        fractional timestep of any sigma in that range (:meth:`sigma_to_t`).
        """
        if spacing in CONTINUOUS_SPACINGS:
            if num_steps < 1:
                raise ConfigError(f"num_steps={num_steps} must be at least 1")
            grid = karras_sigmas if spacing == "karras" else vp_sigmas
            sig = grid(self.sigma_min, self.sigma_max, num_steps).to(self.sigmas.device)
        else:
            sig = self.sigmas[self.timesteps(num_steps, spacing).to(self.sigmas.device)]
        return torch.cat([sig, sig.new_zeros(1)])

    def prior_std(self, sigma: Tensor | float) -> Tensor:
        """Prior std in the VE convention: ``z_T ~ N(0, I)`` becomes ``x_T = z_T sqrt(1 + sigma^2)``."""
        return (1 + torch.as_tensor(sigma, dtype=torch.float64) ** 2).sqrt()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num_timesteps={self.num_timesteps}"
