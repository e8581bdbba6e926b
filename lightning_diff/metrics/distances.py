"""Distances between a set of samples and a reference set, for vectors and flattened images.

These are the quick, feature-free measures every run reports: sliced Wasserstein distance,
errors of the first two moments, and the nearest-neighbour distance ratio used to flag
memorized samples (Yoon et al. 2023; Gu et al. 2023: memorized when
``||x - NN1(x)|| / ||x - NN2(x)|| < 1/3``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced 2-Wasserstein distance (Bonneel et al. 2015) between two point clouds of any shape.

    Projects both sets on random unit directions and averages the squared 1-D W2 distance, computed
    from quantiles so the sets may have different sizes; returns its square root.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    dirs = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(x.device)
    px, _ = (x @ dirs).sort(dim=0)
    py, _ = (y @ dirs).sort(dim=0)
    n = max(px.shape[0], py.shape[0])
    q = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n
    qx = torch.quantile(px, q, dim=0) if px.shape[0] != n else px
    qy = torch.quantile(py, q, dim=0) if py.shape[0] != n else py
    return (qx - qy).pow(2).mean().sqrt()


def moment_errors(x: Tensor, y: Tensor) -> dict[str, float]:
    """Norm of the mean difference and relative Frobenius error of the covariance of x against y."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)
    return {
        "mean_error": float((x.mean(0) - y.mean(0)).norm()),
        "cov_rel_error": float((cov_x - cov_y).norm() / cov_y.norm()),
    }


def nearest_neighbour_ratio(x: Tensor, train: Tensor, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per sample of ``x``: distance to its nearest training sample and the NN1 / NN2 distance ratio.

    Squared distances are ``||a||^2 + ||b||^2 - 2 a.b`` computed chunk by chunk as matrix products,
    so memory stays at ``chunk_size x len(train)`` however many samples there are.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float32)
    train = train.reshape(train.shape[0], -1).to(torch.float32).to(x.device)
    if train.shape[0] < 2:
        raise ValueError("the nearest-neighbour ratio needs at least two training samples")
    train_sq = train.pow(2).sum(1)
    nn1, ratio = [], []
    for chunk in x.split(chunk_size):
        d2 = (chunk.pow(2).sum(1, keepdim=True) + train_sq - 2 * chunk @ train.T).clamp(min=0)
        two = d2.topk(2, dim=1, largest=False).values.sqrt()
        nn1.append(two[:, 0])
        ratio.append(two[:, 0] / two[:, 1].clamp(min=1e-12))
    return torch.cat(nn1), torch.cat(ratio)
