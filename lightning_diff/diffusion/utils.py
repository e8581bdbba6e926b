"""Small tensor helpers shared by the diffusion code."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions to a per-sample tensor so it broadcasts against data.

    Half of our data are 2-D points and half are images, so per-sample scalars of shape (B,) are
    broadcast with this helper instead of a fixed ``[:, None, None, None]``.
    """
    missing = ndim - v.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor against {ndim}-d data")
    return v.reshape(*v.shape, *([1] * missing))


def as_sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return ``sigma`` as a (B,) tensor on ``x``'s device and dtype (a scalar is repeated)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma
