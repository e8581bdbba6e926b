"""Deterministic samplers on the probability-flow ODE, and the adaptive solver they share.

In the denoiser's coordinates (``x = x0 + sigma n``) the probability-flow ODE reads
``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, arXiv 2206.00364, eq. 1 and 3 with
``s(t) = 1``, ``sigma(t) = t``; Song et al. 2021, arXiv 2011.13456, eq. 13 rewritten in these
coordinates). With ``t = log sigma`` it becomes ``dx/dt = x - D(x, e^t)``, which has no ``1/sigma``
blow-up at small noise and spreads the work evenly over the orders of magnitude a schedule spans:
the adaptive solver integrates in ``log sigma``.

:func:`solve_dopri5` is a batched embedded Runge-Kutta 5(4) (Dormand & Prince 1980) in which every
sample carries its own time, step size and accept/reject decision as tensors, so the loop issues no
host synchronisation except one ``all()`` check every ``check_every`` iterations. The likelihood
(``likelihood.py``) uses it on the ODE augmented with the log-density change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.samplers import Generator, StepCallback, denoise_step

# Dormand & Prince 1980 (the DOPRI5 tableau of Hairer, Norsett & Wanner, Solving ODEs I, Sec. II.5).
# Row i of _A gives stage i + 2 from stages 1 .. i + 1; the last row is the 5th-order solution, so the
# seventh stage is evaluated at the new point and is the next step's first stage (FSAL).
_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
# 5th-order weights minus the embedded 4th-order ones (5179/57600, 0, 7571/16695, 393/640,
# -92097/339200, 187/2100, 1/40): the local error estimate.
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0

ODEFunction = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ODESolution:
    """The end state of :func:`solve_dopri5`.

    ``y``: (B, N) state at ``t1``; ``dy``: the derivative there (the last FSAL stage, free);
    ``nfe``: (B,) function evaluations spent on each sample while it was still integrating;
    ``iterations``: solver iterations run for the whole batch.
    """

    y: Tensor
    dy: Tensor
    nfe: Tensor
    iterations: int


def _rms(v: Tensor) -> Tensor:
    return v.pow(2).mean(dim=1).sqrt()


def solve_dopri5(
    f: ODEFunction,
    y0: Tensor,
    t0: Tensor | float,
    t1: Tensor | float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 2000,
    check_every: int = 16,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> ODESolution:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` for a batch of independent problems.

    ``y0`` is (B, N); ``t0``, ``t1`` are scalars or (B,) and ``f`` receives ``t`` as (B,) float64.
    Each sample has its own step size; a step is accepted when the RMS over the sample's entries of
    ``err / (atol + rtol * max(|y|, |y_new|))`` is at most 1 (Hairer et al., Sec. II.4), and the
    next step is ``h * clamp(0.9 err^(-1/5), 0.2, 10)``. The first step size is Hairer's heuristic
    ``0.01 ||y0|| / ||f(t0, y0)||`` (II.4, without the extra evaluation of its second part).

    The whole batch advances together: every iteration evaluates ``f`` six times for all samples
    (stages 2-7; stage 1 is the previous accepted step's stage 7) and finished samples stay put.
    ``nfe`` counts, per sample, 1 for the initial evaluation plus 6 per step it attempted while
    unfinished. The host learns whether all samples have finished only every ``check_every``
    iterations, so a finished batch may run up to ``check_every - 1`` idle iterations; in exchange
    nothing in the loop waits for the device. Raises ``RuntimeError`` if ``max_steps`` iterations
    do not reach ``t1``.
    """
    batch = y0.shape[0]
    device, dtype = y0.device, y0.dtype
    t0 = torch.as_tensor(t0, dtype=torch.float64, device=device).expand(batch).clone()
    t1 = torch.as_tensor(t1, dtype=torch.float64, device=device).expand(batch).clone()
    direction = torch.sign(t1 - t0)

    t, y = t0, y0
    k1 = f(t, y)
    nfe = torch.ones(batch, dtype=torch.long, device=device)
    scale = atol + rtol * y.abs()
    d0, d1 = _rms(y / scale).double(), _rms(k1 / scale).double()
    h = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h = torch.minimum(h, (t1 - t0).abs())
    done = t == t1

    iterations = 0
    for iterations in range(max_steps + 1):
        if (iterations % check_every == 0 or iterations == max_steps) and bool(done.all()):
            break
        if iterations == max_steps:
            raise RuntimeError(
                f"the adaptive ODE solver did not reach the end in max_steps={max_steps} steps "
                f"(rtol={rtol}, atol={atol}): raise max_steps or loosen rtol/atol"
            )
        remaining = (t1 - t).abs()
        last = (h >= remaining) & ~done
        h_step = torch.where(done, torch.zeros_like(h), direction * torch.minimum(h, remaining))
        hy = h_step.to(dtype)[:, None]
        stages = [k1]
        for c, row in zip(_C, _A, strict=True):
            y_stage = y + hy * sum(a * k for a, k in zip(row, stages, strict=True) if a != 0.0)
            stages.append(f(t + c * h_step, y_stage))
        y_new = y_stage  # the last stage was evaluated at the 5th-order solution
        err = hy * sum(e * k for e, k in zip(_E, stages, strict=True) if e != 0.0)
        err_norm = _rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs()))).double()
        err_norm = torch.nan_to_num(err_norm, nan=math.inf)
        accept = (err_norm <= 1) & ~done
        nfe += 6 * (~done).long()

        acc = accept[:, None]
        y = torch.where(acc, y_new, y)
        k1 = torch.where(acc, stages[-1], k1)
        t = torch.where(accept, torch.where(last, t1, t + h_step), t)
        done = done | (accept & last)
        factor = (SAFETY * err_norm.clamp(min=1e-10) ** -0.2).clamp(MIN_FACTOR, MAX_FACTOR)
        h = torch.where(done, h, h_step.abs() * factor)
        if callback is not None:
            callback({"i": iterations, "t": t, "y": y, "h": h, "accepted": accept, "done": done})
    return ODESolution(y=y, dy=k1, nfe=nfe, iterations=iterations)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    callback: StepCallback | None = None,
) -> tuple[Tensor, int]:
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

    Each step takes an Euler step with slope ``d = (x - D(x, sigma)) / sigma`` and corrects it with
    the average of ``d`` and the slope at the Euler point, except the last step to ``sigma = 0``,
    which is Euler only (and lands on ``D(x, sigma)``). ``N`` steps cost ``2N - 1`` evaluations.
    This is also Algorithm 2 with ``S_churn = 0``.
    Deterministic: ``generator`` is accepted for the common signature and unused.
    """
    sigmas = sigmas.to(device=x.device, dtype=torch.float64)
    nfe = 0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = denoise_step(denoiser, x, sigmas, i, callback)
        nfe += 1
        slope = (x - denoised) / sigma.to(x.dtype)
        dsigma = (sigma_next - sigma).to(x.dtype)
        x_euler = x + dsigma * slope
        if sigma_next == 0:
            x = x_euler
            continue
        denoised_next = denoiser(x_euler, sigma_next.to(x.dtype).expand(x.shape[0]))
        nfe += 1
        slope_next = (x_euler - denoised_next) / sigma_next.to(x.dtype)
        x = x + dsigma * (slope + slope_next) / 2
    return x, nfe


@torch.no_grad()
def sample_ode_adaptive(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    callback: StepCallback | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 2000,
    check_every: int = 16,
) -> tuple[Tensor, int]:
    """The probability-flow ODE with adaptive Dormand-Prince RK45 (Song et al. 2021, Sec. 4.3, App. D.3).

    Only the end points of ``sigmas`` matter: it integrates ``dx/dlog(sigma) = x - D(x, sigma)`` from
    ``sigmas[0]`` to the smallest nonzero sigma with :func:`solve_dopri5` (per-sample step sizes,
    tolerances ``rtol``/``atol``), then, if the grid ends at 0, returns ``D(x, sigma_min)`` (the
    reference code's final denoising step). That value is ``x - dx/dlog(sigma)`` at the end point,
    which the solver's last stage already holds, so the denoising step costs no evaluation.

    Returns the mean over samples of the model evaluations each needed (``1 + 6 * attempted
    steps``), rounded to an int. ``callback`` gets ``i``, ``x``, per-sample ``sigma`` and
    ``step_size`` (in log sigma), and the ``accepted`` and ``done`` masks after each iteration.
    Deterministic: ``generator`` is unused.
    """
    sigmas = sigmas.to(device=x.device, dtype=torch.float64)
    nonzero = sigmas[sigmas > 0]
    if len(nonzero) == 0:
        raise ValueError("the sigma grid has no nonzero level to start from")
    shape = x.shape

    def velocity(t: Tensor, y: Tensor) -> Tensor:
        return y - denoiser(y.view(shape), t.exp().to(y.dtype)).reshape(y.shape)

    def report(state: dict[str, Any]) -> None:
        callback(
            {
                "i": state["i"],
                "x": state["y"].view(shape),
                "sigma": state["t"].exp(),
                "step_size": state["h"],
                "accepted": state["accepted"],
                "done": state["done"],
            }
        )

    sol = solve_dopri5(
        velocity,
        x.reshape(shape[0], -1),
        nonzero[0].log(),
        nonzero[-1].log(),
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        check_every=check_every,
        callback=report if callback is not None else None,
    )
    out = sol.y - sol.dy if sigmas[-1] == 0 else sol.y
    return out.view(shape), int(round(sol.nfe.double().mean().item()))
