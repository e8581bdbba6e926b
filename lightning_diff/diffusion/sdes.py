"""Continuous-time forward SDEs of score-based generative modelling (Song et al. 2021, arXiv 2011.13456).

Each SDE ``dz = f(z, t) dt + g(t) dW`` on ``t in [0, T = 1]`` is written in its own coordinates
``z``, with the Gaussian transition ``z_t = alpha_t x0 + std_t n`` (Sec. 3.4 and Appendix B).
Dividing by ``alpha_t`` gives the variance-exploding form of the denoiser interface,
``x = z / alpha_t = x0 + sigma n`` with ``sigma(t) = std_t / alpha_t``; :meth:`SDE.t_of_sigma` is its
inverse. With ``sampling_sigmas`` and ``prior_std`` an SDE is also a *schedule* for
:class:`~lightning_diff.diffusion.samplers.Sampler`, so every sampler of the package runs on it.

Time conventions, as in the paper's reference code: training draws ``t ~ U(train_eps, 1)`` with
``train_eps = 1e-5``; sampling runs from ``T = 1`` down to ``eps`` (1e-3 for VP and sub-VP, 1e-5 for
VE) and a last step to ``sigma = 0`` returns the denoiser's output, the paper's "noise removal".
All coefficients are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.utils import append_dims
from lightning_diff.errors import ConfigError

SDE_SPACINGS = ("uniform", "karras", "vp")
# Spacings of the discrete schedule; on a continuous SDE they all mean uniform steps in t, so the
# DDIM and ancestral configs (``spacing: leading``) run on score-SDE models unchanged.
UNIFORM_ALIASES = ("leading", "trailing", "linspace")

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def as_time(t: Tensor | float) -> Tensor:
    """``t`` (scalar or (B,)) as a float64 tensor, keeping its device."""
    return torch.as_tensor(t).to(torch.float64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (arXiv 2206.00364), eq. 5: ``num_steps`` levels, descending, spaced
    uniformly in ``sigma^(1/rho)`` from ``sigma_max`` to ``sigma_min``."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def vp_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, beta_min: float = 0.1, beta_max: float = 20.0
) -> Tensor:
    """``num_steps`` levels, descending from ``sigma_max`` to ``sigma_min``, spaced uniformly in the
    time of the VP SDE with ``beta`` linear from ``beta_min`` to ``beta_max`` (Song et al. 2021's
    defaults): ``t(sigma)`` solves ``int_0^t beta = log(1 + sigma^2)``.

    This is the grid DDPM's linear schedule and the VP SDE sample on (evenly spaced ``t``), carried
    to any range of noise levels. In relative terms it is finest around ``sigma ~ 1``, the scale of
    data normalised to unit variance or to [-1, 1], and coarser at the extremes; with the
    closed-form Gaussian denoiser Heun's method on it is 2-3 times more accurate per evaluation
    than on the ``karras`` grid (``bench/sampler_accuracy.py``).
    """
    if num_steps < 1:
        raise ConfigError(f"num_steps={num_steps} must be at least 1")
    slope = beta_max - beta_min

    def t_of(sigma: float) -> float:
        integral = math.log1p(sigma**2)
        return 2 * integral / (beta_min + math.sqrt(beta_min**2 + 2 * slope * integral))

    t = torch.linspace(t_of(sigma_max), t_of(sigma_min), num_steps, dtype=torch.float64)
    sig = torch.expm1(beta_min * t + 0.5 * slope * t**2).sqrt()
    sig[0] = sigma_max  # the end points exactly, free of the round trip's rounding
    if num_steps > 1:
        sig[-1] = sigma_min
    return sig


class ReverseSDE:
    """The reverse-time SDE or the probability-flow ODE of a forward SDE, in the SDE's coordinates.

    ``dz = [f(z, t) - c g(t)^2 score(z, t)] dt + g_rev(t) dW_bar``, integrated from ``t = T`` down,
    with ``c = 1`` and ``g_rev = g`` for the reverse SDE (Song et al. 2021, eq. 6; Anderson 1982) and
    ``c = 1/2`` and ``g_rev = 0`` for the probability-flow ODE (eq. 13).

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(z, t) = grad_z log p_t(z)`` in the SDE's coordinates.
        probability_flow: return the ODE instead of the SDE.
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.sde = sde
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    def drift(self, z: Tensor, t: Tensor | float) -> Tensor:
        t = as_time(t).to(z.device)
        g2 = append_dims(self.sde.diffusion(t) ** 2, z.ndim).to(z.dtype)
        factor = 0.5 if self.probability_flow else 1.0
        return self.sde.drift(z, t) - factor * g2 * self.score_fn(z, t)

    def diffusion(self, t: Tensor | float) -> Tensor:
        g = self.sde.diffusion(t)
        return torch.zeros_like(g) if self.probability_flow else g


class SDE(nn.Module):
    """Base class of the forward SDEs.

    Subclasses provide ``drift``, ``diffusion``, ``marginal``, ``t_of_sigma`` and ``prior_z_std``;
    the conversions to the denoiser interface, the prior, the reverse process and the sampling grid
    are shared.

    Args:
        eps: the smallest time a sampler visits before its final denoising step.
        train_eps: the smallest training time, ``t ~ U(train_eps, T)``.
    """

    T = 1.0

    def __init__(self, eps: float, train_eps: float = 1e-5):
        super().__init__()
        if not 0.0 < eps < self.T or not 0.0 <= train_eps < self.T:
            raise ConfigError(
                f"need 0 < eps < 1 and 0 <= train_eps < 1; got eps={eps}, train_eps={train_eps}"
            )
        self.eps = float(eps)
        self.train_eps = float(train_eps)

    # ---- what a subclass provides ------------------------------------------------------------
    def drift(self, z: Tensor, t: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        """``f(z, t)`` of ``dz = f dt + g dW``; ``t`` scalar or (B,)."""
        raise NotImplementedError

    def diffusion(self, t: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        """``g(t)``, float64, shaped like ``t``."""
        raise NotImplementedError

    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``(alpha_t, std_t)`` of the transition ``z_t = alpha_t x0 + std_t n``, float64."""
        raise NotImplementedError

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        """Inverse of :meth:`sigma`, float64."""
        raise NotImplementedError

    def prior_z_std(self, t: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        """Std of the Gaussian the sampler starts from at time ``t``, in the SDE's coordinates."""
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------
    def sigma(self, t: Tensor | float) -> Tensor:
        """The noise level of the denoiser interface: ``std_t / alpha_t``."""
        alpha, std = self.marginal(t)
        return std / alpha

    def prior_std(self, sigma: Tensor | float) -> Tensor:
        """Std of the prior in the variance-exploding coordinates ``x = z / alpha``.

        The sampler starts from the SDE's prior at the time ``t`` of ``sigma``: ``N(0, I)`` in ``z``
        for VP and sub-VP (the paper's choice for both; sub-VP's own marginal std at ``T`` is
        ``1 - 4e-5``), which is ``N(0, 1 / alpha_t^2)`` in ``x``; ``N(0, sigma^2)`` for VE.
        """
        t = self.t_of_sigma(sigma)
        alpha, _ = self.marginal(t)
        return self.prior_z_std(t) / alpha

    def prior_logp(self, z: Tensor) -> Tensor:
        """Log-density of the prior ``N(0, s^2 I)`` at ``T`` in the SDE's coordinates, per sample (B,)."""
        s = float(self.prior_z_std(self.T))
        flat = z.reshape(z.shape[0], -1).to(torch.float64)
        dim = flat.shape[1]
        return -0.5 * dim * math.log(2 * math.pi * s**2) - flat.pow(2).sum(1) / (2 * s**2)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse SDE (eq. 6) or the probability-flow ODE (eq. 13) driven by ``score_fn(z, t)``."""
        return ReverseSDE(self, score_fn, probability_flow)

    def sampling_sigmas(self, num_steps: int, spacing: str = "uniform") -> Tensor:
        """The sampler's noise levels: ``num_steps`` values, descending, then a final 0.

        ``uniform``: ``sigma(t_i)`` with ``t_i`` uniform from ``T`` to ``eps``, the grid of the paper's
        samplers. ``karras``: Karras et al. 2022 eq. 5 (``rho = 7``) between ``sigma(eps)`` and
        ``sigma(T)``. ``vp``: :func:`vp_sigmas` between the same end points (for the VP SDE with its
        default betas this is ``uniform``). ``leading``, ``trailing`` and ``linspace`` are accepted
        as aliases of ``uniform``, so the discrete schedule's sampler configs work here too.
        """
        if num_steps < 1:
            raise ConfigError(f"num_steps={num_steps} must be at least 1")
        if spacing in UNIFORM_ALIASES:
            spacing = "uniform"
        if spacing == "uniform":
            sig = self.sigma(torch.linspace(self.T, self.eps, num_steps, dtype=torch.float64))
        elif spacing == "karras":
            sig = karras_sigmas(float(self.sigma(self.eps)), float(self.sigma(self.T)), num_steps)
        elif spacing == "vp":
            sig = vp_sigmas(float(self.sigma(self.eps)), float(self.sigma(self.T)), num_steps)
        else:
            choices = ", ".join(SDE_SPACINGS + UNIFORM_ALIASES)
            raise ConfigError(f"unknown spacing {spacing!r} for a score SDE: use one of {choices}")
        return torch.cat([sig, sig.new_zeros(1)])


class _LinearBetaSDE(SDE):
    """Shared by VP and sub-VP: ``beta(t) = beta_min + t (beta_max - beta_min)``, drift ``-beta z / 2``."""

    def __init__(self, beta_min: float, beta_max: float, eps: float, train_eps: float):
        super().__init__(eps, train_eps)
        if not 0.0 < beta_min <= beta_max:
            raise ConfigError(f"need 0 < beta_min <= beta_max, got {beta_min} and {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor | float) -> Tensor:
        return self.beta_min + as_time(t) * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: Tensor | float) -> Tensor:
        """``log alpha_t = -1/2 int_0^t beta = -1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min``."""
        t = as_time(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_of_beta_integral(self, integral: Tensor) -> Tensor:
        """The ``t >= 0`` with ``int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2 = integral``.

        The positive root of the quadratic, in the form ``2c / (b + sqrt(b^2 + 4ac))`` that stays
        accurate as ``integral -> 0`` and when ``beta_max = beta_min``.
        """
        slope = self.beta_max - self.beta_min
        return 2 * integral / (self.beta_min + (self.beta_min**2 + 2 * slope * integral).sqrt())

    def drift(self, z: Tensor, t: Tensor | float) -> Tensor:
        return -0.5 * append_dims(self.beta(t).to(z.device), z.ndim).to(z.dtype) * z

    def prior_z_std(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(as_time(t))

    def extra_repr(self) -> str:
        return f"beta_min={self.beta_min:g}, beta_max={self.beta_max:g}, eps={self.eps:g}"


class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE (Song et al. 2021, Sec. 3.4), the continuous limit of DDPM:
    ``dz = -1/2 beta(t) z dt + sqrt(beta(t)) dW``.

    ``alpha_t = exp(-1/2 int_0^t beta)``, ``std_t = sqrt(1 - alpha_t^2)``, so
    ``sigma^2 = 1 / alpha_t^2 - 1`` and ``t_of_sigma`` solves ``int_0^t beta = log(1 + sigma^2)``.
    """

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3, train_eps: float = 1e-5
    ):
        super().__init__(beta_min, beta_max, eps, train_eps)

    def diffusion(self, t: Tensor | float) -> Tensor:
        return self.beta(t).sqrt()

    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        lmc = self.log_mean_coeff(t)
        return lmc.exp(), (-torch.expm1(2 * lmc)).sqrt()

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.expm1(-2 * self.log_mean_coeff(t)).sqrt()

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        return self.t_of_beta_integral(torch.log1p(as_time(sigma) ** 2))


class SubVPSDE(_LinearBetaSDE):
    """Sub-VP SDE (Song et al. 2021, Sec. 3.4):
    ``dz = -1/2 beta(t) z dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dW``.

    Same mean as VP; its variance ``(1 - alpha_t^2)^2`` lies below VP's, so the marginal *std* is
    ``1 - alpha_t^2`` with no square root (the reference code's ``1 - exp(2 log_mean_coeff)``). Then
    ``sigma = 1 / alpha_t - alpha_t = 2 sinh(-log alpha_t)`` and ``t_of_sigma`` solves
    ``int_0^t beta = 2 asinh(sigma / 2)``.
    """

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3, train_eps: float = 1e-5
    ):
        super().__init__(beta_min, beta_max, eps, train_eps)

    def diffusion(self, t: Tensor | float) -> Tensor:
        # 1 - exp(-2 int_0^t beta) = 1 - alpha_t^4
        return (self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t))).sqrt()

    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        lmc = self.log_mean_coeff(t)
        return lmc.exp(), -torch.expm1(2 * lmc)

    def sigma(self, t: Tensor | float) -> Tensor:
        return 2 * torch.sinh(-self.log_mean_coeff(t))

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        return self.t_of_beta_integral(2 * torch.asinh(as_time(sigma) / 2))


class VESDE(SDE):
    """Variance-exploding SDE (Song et al. 2021, Sec. 3.4), the continuous limit of SMLD / NCSN:
    ``dz = sqrt(d sigma(t)^2 / dt) dW`` with ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    Here ``z`` already is the denoiser interface's ``x``: ``alpha_t = 1`` and ``std_t = sigma(t)``, as in
    the paper and its code. Strictly, the SDE started at ``x0`` at ``t = 0`` reaches variance
    ``sigma(t)^2 - sigma_min^2``; the paper's convention is that ``t = 0`` holds the data perturbed by
    ``sigma_min`` (negligible for ``sigma_min = 0.01``). ``t_of_sigma`` is the exact inverse
    ``log(sigma / sigma_min) / log(sigma_max / sigma_min)``, negative below ``sigma_min``.
    The prior at ``T`` is ``N(0, sigma_max^2 I)``.
    """

    def __init__(
        self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5, train_eps: float = 1e-5
    ):
        super().__init__(eps, train_eps)
        if not 0.0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.sigma_min * torch.exp(as_time(t) * self.log_ratio)

    def drift(self, z: Tensor, t: Tensor | float) -> Tensor:
        return torch.zeros_like(z)

    def diffusion(self, t: Tensor | float) -> Tensor:
        # d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min)
        return self.sigma(t) * math.sqrt(2 * self.log_ratio)

    def marginal(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        std = self.sigma(t)
        return torch.ones_like(std), std

    def t_of_sigma(self, sigma: Tensor | float) -> Tensor:
        return torch.log(as_time(sigma) / self.sigma_min) / self.log_ratio

    def prior_z_std(self, t: Tensor | float) -> Tensor:
        return self.sigma(t)

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g}, eps={self.eps:g}"
