"""Divergences between two Gaussians: KL in closed form, total variation exactly in 1-D and by
Monte Carlo in any dimension (``TV = E_p[(1 - q/p)_+]``, with its standard error)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _as64(*tensors: Tensor) -> list[Tensor]:
    return [torch.as_tensor(t, dtype=torch.float64) for t in tensors]


def gaussian_kl(mean_p: Tensor, cov_p: Tensor, mean_q: Tensor, cov_q: Tensor) -> float:
    """``KL(N(mean_p, cov_p) || N(mean_q, cov_q))`` in nats; covariances must be positive definite."""
    mean_p, cov_p, mean_q, cov_q = _as64(mean_p, cov_p, mean_q, cov_q)
    chol_q = torch.linalg.cholesky(cov_q)
    chol_p = torch.linalg.cholesky(cov_p)
    dim = mean_p.numel()
    solved = torch.cholesky_solve(cov_p, chol_q)
    diff = (mean_q - mean_p).reshape(-1, 1)
    maha = (diff.T @ torch.cholesky_solve(diff, chol_q)).squeeze()
    logdet = 2 * (chol_q.diagonal().log().sum() - chol_p.diagonal().log().sum())
    return float(0.5 * (solved.trace() + maha - dim + logdet))


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_tv_1d(mean_p: float, std_p: float, mean_q: float, std_q: float) -> float:
    """Exact total variation between ``N(mean_p, std_p^2)`` and ``N(mean_q, std_q^2)``.

    The densities cross at the roots of a quadratic; the set where ``p > q`` is the interval between
    them or its complement, so TV is the difference of the two probabilities of that interval.
    """
    if std_p <= 0 or std_q <= 0:
        raise ValueError(f"standard deviations must be positive, got {std_p} and {std_q}")
    if math.isclose(std_p, std_q, rel_tol=1e-12):
        return 2 * _normal_cdf(abs(mean_p - mean_q) / (2 * std_p)) - 1
    # log p = log q  <=>  a x^2 + b x + c = 0
    a = 1 / (2 * std_q**2) - 1 / (2 * std_p**2)
    b = mean_p / std_p**2 - mean_q / std_q**2
    c = mean_q**2 / (2 * std_q**2) - mean_p**2 / (2 * std_p**2) + math.log(std_q / std_p)
    root = math.sqrt(max(b * b - 4 * a * c, 0.0))  # > 0 whenever the variances differ
    lo, hi = sorted(((-b - root) / (2 * a), (-b + root) / (2 * a)))
    inner_p = _normal_cdf((hi - mean_p) / std_p) - _normal_cdf((lo - mean_p) / std_p)
    inner_q = _normal_cdf((hi - mean_q) / std_q) - _normal_cdf((lo - mean_q) / std_q)
    return abs(inner_p - inner_q)


def _log_density(x: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
    white = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False)
    dim = mean.numel()
    return -0.5 * (white**2).sum(0) - chol.diagonal().log().sum() - 0.5 * dim * math.log(2 * math.pi)


def gaussian_tv_mc(
    mean_p: Tensor,
    cov_p: Tensor,
    mean_q: Tensor,
    cov_q: Tensor,
    num_samples: int = 1_000_000,
    seed: int = 0,
    chunk: int = 250_000,
) -> tuple[float, float]:
    """Monte Carlo total variation ``E_p[(1 - q/p)_+]`` over ``num_samples`` draws of ``p`` and its
    standard error. The integrand lies in [0, 1], so the error is at most ``0.5 / sqrt(num_samples)``."""
    mean_p, cov_p, mean_q, cov_q = _as64(mean_p, cov_p, mean_q, cov_q)
    chol_p, chol_q = torch.linalg.cholesky(cov_p), torch.linalg.cholesky(cov_q)
    gen = torch.Generator().manual_seed(seed)
    total, total_sq, done = 0.0, 0.0, 0
    while done < num_samples:
        n = min(chunk, num_samples - done)
        x = mean_p + torch.randn(n, mean_p.numel(), generator=gen, dtype=torch.float64) @ chol_p.T
        ratio = (_log_density(x, mean_q, chol_q) - _log_density(x, mean_p, chol_p)).exp()
        term = (1 - ratio).clamp(min=0)
        total += float(term.sum())
        total_sq += float((term**2).sum())
        done += n
    mean = total / num_samples
    var = max(total_sq / num_samples - mean**2, 0.0)
    return mean, math.sqrt(var / num_samples)
