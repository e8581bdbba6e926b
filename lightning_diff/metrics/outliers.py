"""Where vector samples land: far outliers, points between mixture components, mixture weights.

These are the checks a user of ``data=array`` would make on 2-D or low-dimensional samples: the
share of samples beyond a multiple of the training data's radius (a sampler or parameterisation
that extrapolates puts rare points dozens of radii away, which moments and sliced distances see
only as a blur), and for data from a known Gaussian mixture, the share of samples that belong to no
component and the weights with which samples fall into each component.
"""

from __future__ import annotations

import torch
from torch import Tensor


def data_radius(train: Tensor) -> float:
    """The largest distance of a training point from the training mean."""
    flat = train.reshape(train.shape[0], -1).to(torch.float64)
    return float((flat - flat.mean(0)).norm(dim=1).max())


def outlier_fraction(samples: Tensor, train: Tensor, factor: float = 1.5) -> float:
    """Share of samples farther than ``factor`` times :func:`data_radius` from the training mean."""
    flat = train.reshape(train.shape[0], -1).to(torch.float64)
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    dist = (x - flat.mean(0)).norm(dim=1)
    return float((dist > factor * data_radius(train)).double().mean())


def mahalanobis(samples: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """``(N, K)`` Mahalanobis distances of N samples to K Gaussian components ``(K, D)``, ``(K, D, D)``."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    diff = x[:, None, :] - means.to(torch.float64)[None]
    chol = torch.linalg.cholesky(covs.to(torch.float64))
    # Solve L y = diff for every component: ||y|| is the Mahalanobis distance.
    y = torch.linalg.solve_triangular(chol[None], diff[..., None], upper=False)[..., 0]
    return y.norm(dim=-1)


def mixture_report(samples: Tensor, means: Tensor, covs: Tensor, max_distance: float = 5.0) -> dict:
    """``between``: share of samples farther than ``max_distance`` (Mahalanobis) from every component;
    ``weights``: share of the other samples nearest (Mahalanobis) to each component."""
    d = mahalanobis(samples, means, covs)
    inside = d.min(dim=1).values <= max_distance
    nearest = d[inside].argmin(dim=1)
    counts = torch.bincount(nearest, minlength=means.shape[0]).double()
    weights = counts / counts.sum().clamp(min=1)
    return {"between": float((~inside).double().mean()), "weights": weights.tolist()}


def covariance_error(samples: Tensor, cov: Tensor) -> float:
    """Relative Frobenius error ``||C_samples - C|| / ||C||`` of the samples' covariance."""
    x = samples.reshape(samples.shape[0], -1).to(torch.float64)
    c = torch.cov(x.T).reshape(cov.shape)
    cov = cov.to(torch.float64)
    return float(torch.linalg.matrix_norm(c - cov) / torch.linalg.matrix_norm(cov))
