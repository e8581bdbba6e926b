"""Distances between a set of samples and a reference set, for vectors and flattened images.

These are the quick, feature-free measures every run reports: sliced Wasserstein distance,
errors of the first two moments, and the nearest-neighbour distance ratio used to flag
memorized samples (Yoon et al. 2023; Gu et al. 2023: memorized when
``||x - NN1(x)|| / ||x - NN2(x)|| < 1/3``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_rows(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """Up to ``n`` rows of ``x`` drawn without replacement with ``seed``, in their original order.

    Data sets keep their storage order (a file sorted by class stays sorted), so a prefix is not a
    sample of the data; every "what real data score with n points" baseline takes its rows here.
    """
    if n >= len(x):
        return x
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[:n].sort().values
    return x[idx.to(x.device)]


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


# Extra candidates whose distances are recomputed exactly, beyond the k that are returned.
_RERANK_MARGIN = 4


def nearest_neighbours(x: Tensor, train: Tensor, k: int = 2, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest training samples of every sample of ``x``, in L2 over flattened coordinates.

    Returns ``(distances, indices)``, both ``(len(x), k)``, nearest first; ``indices`` index ``train``.

    Candidates come from squared distances ``||a||^2 + ||b||^2 - 2 a.b`` computed chunk by chunk as
    matrix products, so memory stays at ``chunk_size x len(train)`` however many samples there are.
    That expansion cancels badly when a sample nearly coincides with a training sample, the very case
    memorization metrics look for (in float32 a true distance of 1e-4 between points of [-1, 1]^64
    comes out as 0 or as 3e-3), so the distances of the ``k + 4`` best candidates are recomputed as
    ``||a - b||`` and re-sorted. Works in float64 when either input is float64, else
    float32, on the device of ``x``.
    """
    if not 1 <= k <= len(train):
        raise ValueError(f"k={k} nearest neighbours asked for among {len(train)} training samples")
    dtype = torch.float64 if torch.float64 in (x.dtype, train.dtype) else torch.float32
    x = x.reshape(x.shape[0], -1).to(dtype)
    train = train.reshape(train.shape[0], -1).to(device=x.device, dtype=dtype)
    if x.shape[1] != train.shape[1]:
        raise ValueError(f"samples have {x.shape[1]} coordinates, training samples {train.shape[1]}")
    train_sq = train.pow(2).sum(1)
    num_candidates = min(len(train), k + _RERANK_MARGIN)
    distances, indices = [], []
    for chunk in x.split(chunk_size):
        d2 = torch.addmm(train_sq, chunk, train.T, alpha=-2)  # ||b||^2 - 2 a.b; ||a||^2 changes no order
        candidates = d2.topk(num_candidates, dim=1, largest=False).indices
        exact = (chunk[:, None, :] - train[candidates]).norm(dim=2)
        best, order = exact.topk(k, dim=1, largest=False)
        distances.append(best)
        indices.append(candidates.gather(1, order))
    if not distances:
        return x.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=x.device)
    return torch.cat(distances), torch.cat(indices)


def nearest_neighbour_ratio(x: Tensor, train: Tensor, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per sample of ``x``: distance to its nearest training sample and the NN1 / NN2 distance ratio.

    Distances come from :func:`nearest_neighbours` (chunked matrix products, exact for the two kept).
    """
    if train.shape[0] < 2:
        raise ValueError("the nearest-neighbour ratio needs at least two training samples")
    distances, _ = nearest_neighbours(x, train, k=2, chunk_size=chunk_size)
    return distances[:, 0], distances[:, 0] / distances[:, 1].clamp(min=1e-12)
