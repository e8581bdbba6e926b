"""The width of one shared isotropic kernel that minimises the kernel family's own objective.

A leave-one-out score-matching bandwidth: ``model=kernel_wpo`` starts its precision field there
(``model.bandwidth=loo``), so the fit starts at the best kernel density of the isotropic family;
``bench/families.py`` samples that density as the baseline every fitted kernel model has to beat.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_diff.diffusion.kernel_score import KernelScore, scott_bandwidth


@torch.no_grad()
def isotropic_objective(centers: Tensor, points: Tensor, bandwidth: float, sigma: float = 0.0) -> float:
    """The family's objective for one isotropic kernel width shared by every centre: the mean
    Hyvarinen loss of ``points`` under the mixture of ``centers`` (each point's own centre left out)."""
    kernel = KernelScore(centers, "isotropic", bandwidth=bandwidth, tied=True, dtype=centers.dtype)
    flat = points.reshape(points.shape[0], -1).to(centers.dtype)
    return kernel.hyvarinen(flat, sigma, exclude_self=True).mean().item()


def isotropic_optimum(
    centers: Tensor,
    points: Tensor,
    sigma: float = 0.0,
    grid: int = 25,
    span: float = 30.0,
    tol: float = 1e-3,
) -> tuple[float, float]:
    """The width ``h`` (``P = I / h^2``) of one shared isotropic kernel that minimises
    :func:`isotropic_objective`, and the objective there.

    A leave-one-out score-matching bandwidth: ``grid`` log-spaced widths from Scott's rule divided by
    ``span`` to Scott's rule times 3, then golden-section search in ``log h`` between the best grid
    point's neighbours, to a relative width of ``tol``.
    """
    centers = centers.reshape(centers.shape[0], -1).to(torch.float64)
    scott = scott_bandwidth(centers)
    logs = torch.linspace(math.log(scott / span), math.log(3 * scott), grid, dtype=torch.float64).tolist()
    values = [isotropic_objective(centers, points, math.exp(v), sigma) for v in logs]
    finite = [v if math.isfinite(v) else math.inf for v in values]
    best = min(range(grid), key=finite.__getitem__)
    if not math.isfinite(finite[best]):
        raise ValueError("the isotropic objective is not finite at any width (are the points distinct?)")
    lo, hi = logs[max(best - 1, 0)], logs[min(best + 1, grid - 1)]
    golden = (math.sqrt(5) - 1) / 2

    def objective(log_h: float) -> float:
        value = isotropic_objective(centers, points, math.exp(log_h), sigma)
        return value if math.isfinite(value) else math.inf

    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = objective(a), objective(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = objective(b)
    log_h, value = (a, fa) if fa <= fb else (b, fb)
    if finite[best] < value:  # the bracket's ends can beat its interior when the grid's best is at an end
        log_h, value = logs[best], finite[best]
    return math.exp(log_h), value
