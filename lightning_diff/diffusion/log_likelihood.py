"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, arXiv 2011.13456, App. D.2).

Along the flow ``dx/dt = F(x, t)`` the log density obeys ``d log p_t(x(t)) / dt = -div_x F``
(the instantaneous change of variables, Chen et al. 2018, Thm. 1), so integrating data up to the
prior gives ``log p(x0) = log p_prior(x_T) + int div_x F dt``. We integrate in ``t = log sigma``
where ``F = x - D(x, sigma)`` (see ``ode.py``); the integral of the divergence does not depend on
the time variable. ``div_x F = dim - tr(dD/dx)``: the identity part is exact and only the
denoiser's Jacobian trace is estimated, by Hutchinson's ``E[v^T J v]`` with probes ``v`` fixed
along each trajectory (Grathwohl et al. 2019, FFJORD, Sec. 3.1), from one vector-Jacobian product
per probe, or computed exactly from ``dim`` of them for low-dimensional data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.ode import solve_dopri5
from lightning_diff.diffusion.random import SampleGenerators, randn
from lightning_diff.errors import ConfigError

PROBES = ("rademacher", "gaussian")
METHODS = ("rk45", "heun")
LEVELS = 256


def sigma_range(schedule: Any, num_steps: int = 1000) -> tuple[float, float]:
    """The noise range the likelihood integrates over: ``(sigma_min, sigma_max)``.

    A schedule's own ``sigma_min`` / ``sigma_max`` attributes when it has them (``DiscreteSchedule``:
    the sigmas of its first and last training step); otherwise the end points of its sampling grid
    ``sampling_sigmas(num_steps)`` (the first entry and the last nonzero one).
    """
    if hasattr(schedule, "sigma_min") and hasattr(schedule, "sigma_max"):
        return float(schedule.sigma_min), float(schedule.sigma_max)
    grid = schedule.sampling_sigmas(num_steps)
    grid = grid[grid > 0]
    return float(grid[-1]), float(grid[0])


def _probes(shape: tuple[int, int, int], kind: str, generator: Any, device, dtype) -> Tensor:
    """(B, P, dim) probes with ``E[v v^T] = I``; Rademacher signs are the signs of normal draws."""
    z = randn(shape, generator, device=device, dtype=dtype)
    return torch.where(z >= 0, 1.0, -1.0).to(dtype) if kind == "rademacher" else z


def ode_log_likelihood(
    denoiser: Denoiser,
    x0: Tensor,
    schedule: Any,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    num_probes: int = 1,
    probe: str = "rademacher",
    exact_trace: bool = False,
    generator: torch.Generator | SampleGenerators | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "rk45",
    num_steps: int = 100,
    max_steps: int = 2000,
) -> dict[str, Any]:
    """Log density of ``x0`` (B, ...) under the model's probability-flow ODE, in nats.

    Integrates ``x`` from ``sigma_min`` (default: :func:`sigma_range`) up to ``sigma_max``
    together with ``delta_logp = int div_x F dt``, with adaptive RK45 (``method="rk45"``, per-sample
    steps, tolerances ``rtol``/``atol`` on the joint state, see ``solve_dopri5``) or ``num_steps``
    Heun steps evenly spaced in ``log sigma`` (``method="heun"``). The prior at ``sigma_max`` is
    ``N(0, prior_std(sigma_max)^2 I)`` in x coordinates. The data ``x0`` stand at ``sigma_min``:
    ``log_likelihood`` is the model's density of ``x0`` convolved with ``N(0, sigma_min^2 I)``.

    The trace is exact (``exact_trace=True``: ``dim`` backward passes per evaluation, for
    low-dimensional data) or Hutchinson's estimate averaged over ``num_probes`` probes per sample
    (``probe``: ``rademacher`` or ``gaussian``), drawn once from ``generator`` before integrating.

    Returns ``log_likelihood``, ``prior_logp``, ``delta_logp`` (each (B,)), ``latent`` (x at
    ``sigma_max``) and ``nfe``: forward model evaluations per sample (mean, rounded), each followed
    by ``num_probes`` (or ``dim``) vector-Jacobian products.
    """
    if probe not in PROBES:
        raise ConfigError(f"unknown trace probe {probe!r}: use one of {', '.join(PROBES)}")
    if method not in METHODS:
        raise ConfigError(f"unknown likelihood solver {method!r}: use one of {', '.join(METHODS)}")
    default_min, default_max = sigma_range(schedule)
    sigma_min = default_min if sigma_min is None else float(sigma_min)
    sigma_max = default_max if sigma_max is None else float(sigma_max)
    if not 0 < sigma_min < sigma_max:
        raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")

    shape, dtype, device = x0.shape, x0.dtype, x0.device
    batch, dim = shape[0], x0[0].numel()
    probes = None
    if not exact_trace:
        probes = _probes((batch, num_probes, dim), probe, generator, device, dtype)

    def augmented(t: Tensor, state: Tensor) -> Tensor:
        """``d/dt (x, delta) = (x - D, dim - tr dD/dx)`` at ``sigma = exp(t)``."""
        with torch.enable_grad():
            x = state[:, :dim].detach().requires_grad_(True)
            denoised = denoiser(x.view(shape), t.exp().to(dtype)).reshape(batch, dim)
            if probes is None:
                rows = [
                    torch.autograd.grad(denoised[:, i].sum(), x, retain_graph=i < dim - 1)[0][:, i]
                    for i in range(dim)
                ]
                trace = torch.stack(rows).sum(0)
            else:
                estimates = []
                for j in range(num_probes):
                    v = probes[:, j]
                    vjp = torch.autograd.grad(denoised, x, v, retain_graph=j < num_probes - 1)[0]
                    estimates.append((vjp * v).sum(1))
                trace = torch.stack(estimates).mean(0)
        return torch.cat([x.detach() - denoised.detach(), (dim - trace.detach())[:, None]], dim=1)

    state = torch.cat([x0.reshape(batch, dim), x0.new_zeros(batch, 1)], dim=1)
    t0, t1 = math.log(sigma_min), math.log(sigma_max)
    if method == "rk45":
        sol = solve_dopri5(augmented, state, t0, t1, rtol=rtol, atol=atol, max_steps=max_steps)
        state, nfe = sol.y, int(round(sol.nfe.double().mean().item()))
    else:
        state = _heun(augmented, state, torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64).tolist())
        nfe = 2 * num_steps

    latent, delta_logp = state[:, :dim], state[:, dim]
    std = float(schedule.prior_std(sigma_max))
    prior_logp = -0.5 * latent.double().pow(2).sum(1) / std**2 - dim * (
        0.5 * math.log(2 * math.pi) + math.log(std)
    )
    prior_logp = prior_logp.to(dtype)
    return {
        "log_likelihood": prior_logp + delta_logp,
        "prior_logp": prior_logp,
        "delta_logp": delta_logp,
        "latent": latent.reshape(shape),
        "nfe": nfe,
    }


def _heun(f, y: Tensor, ts: list[float]) -> Tensor:
    """Heun's method over the grid ``ts`` (two evaluations per step)."""
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        h = t_next - t
        slope = f(y.new_full((y.shape[0],), t, dtype=torch.float64), y)
        y_euler = y + h * slope
        y = y + h / 2 * (slope + f(y.new_full((y.shape[0],), t_next, dtype=torch.float64), y_euler))
    return y


def dequantize(x: Tensor, generator: torch.Generator | SampleGenerators | None = None) -> Tensor:
    """Uniform dequantisation of 8-bit images stored in [-1, 1].

    Images are loaded as ``k / 127.5 - 1`` for levels ``k = 0 .. 255``; we recover ``k`` by rounding
    and return ``(k + u) / 128 - 1`` with ``u ~ U(0, 1)`` per entry, i.e. ``((k + u) / 256)`` on
    [0, 1] rescaled to [-1, 1], the convention of the score-SDE reference evaluation. The 256 bins of
    width ``2 / 256`` tile [-1, 1) exactly, so the model's density ``p`` of the dequantised point
    bounds the 8-bit data's probability by ``log P(k) >= E_u log p + dim log(2 / 256)`` (Theis et al.
    2016): hence the ``+ 7`` bits of :func:`bits_per_dim`. Data with fewer levels (digits, 17) are
    first snapped to the nearest 8-bit level. The uniforms come from normal draws through the normal
    CDF, so per-sample generators work here too.
    """
    levels = ((x + 1) * (LEVELS - 1) / 2).round().clamp(0, LEVELS - 1)
    u = torch.special.ndtr(randn(x.shape, generator, device=x.device, dtype=torch.float64)).to(x.dtype)
    return (levels + u) / (LEVELS / 2) - 1


def bits_per_dim(log_likelihood: Tensor, num_dims: int, data: str = "images") -> Tensor:
    """Negative log-likelihood per dimension: bits/dim for images, nats/dim for vectors.

    ``data="images"``: ``-log p / (dim ln 2) + 7`` for the density of uniformly dequantised 8-bit
    images in [-1, 1] (see :func:`dequantize`: each dimension's bin has width ``2 / 256 = 2^-7``, so
    the discrete probability is the density times ``2^(-7 dim)``; data in [0, 1] would add 8).
    ``data="vectors"``: ``-log p / dim`` in nats, no offset.
    """
    if data == "images":
        return -log_likelihood / (num_dims * math.log(2)) + math.log2(LEVELS / 2)
    if data == "vectors":
        return -log_likelihood / num_dims
    raise ConfigError(f"unknown data kind {data!r}: use images or vectors")
