"""Closed-form scores: the Gaussian probability flow, Gaussian mixtures and the training set itself.

Wang & Vastola 2024 (arXiv 2412.09726) compare learned scores with three analytic references of
increasing detail: the data's Gaussian (mean and covariance), a Gaussian mixture (a coarse-grained
training set), and the delta mixture on the training points (the "empirical optimal" score, which
reproduces training samples: memorization). All are :class:`Denoiser` objects in the usual
``x = x0 + sigma n`` coordinates, computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import Denoiser, GaussianDenoiser
from lightning_diff.diffusion.random import normal_rows, pick_components
from lightning_diff.diffusion.utils import as_sigma_batch


def data_moments(data: Tensor, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and maximum-likelihood covariance of samples of any per-sample shape, in float64.

    Accumulated over row chunks, so a large image set never needs a float64 copy of itself.
    """
    flat = data.reshape(data.shape[0], -1)
    n = flat.shape[0]
    mean = torch.zeros(flat.shape[1], dtype=torch.float64, device=data.device)
    for start in range(0, n, chunk_size):
        mean += flat[start : start + chunk_size].to(torch.float64).sum(0)
    mean /= n
    cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=data.device)
    for start in range(0, n, chunk_size):
        centred = flat[start : start + chunk_size].to(torch.float64) - mean
        cov += centred.T @ centred
    return mean, cov / n


def gaussian_flow(
    denoiser: GaussianDenoiser, x: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float
) -> Tensor:
    """Move ``x`` along the probability-flow ODE of Gaussian data from ``sigma_from`` to ``sigma_to``.

    With ``c = U^T (x - mu)`` each coordinate obeys ``dc_k/dsigma = sigma c_k / (lambda_k + sigma^2)``,
    whose solution is ``c_k(sigma) = c_k(sigma0) sqrt((lambda_k + sigma^2) / (lambda_k + sigma0^2))``
    (Wang & Vastola 2024, Sec. 4). Zero eigenvalues give ``sigma / sigma0``, the same formula. The
    sigmas are scalars or per-sample (B,); the data may have any shape.
    """
    s0 = as_sigma_batch(sigma_from, x).to(torch.float64)[:, None]
    s1 = as_sigma_batch(sigma_to, x).to(torch.float64)[:, None]
    lam = denoiser.eigvals
    coeff = (x.reshape(x.shape[0], -1).to(torch.float64) - denoiser.mean) @ denoiser.eigvecs
    coeff = coeff * ((lam + s1**2) / (lam + s0**2)).sqrt()
    return (denoiser.mean + coeff @ denoiser.eigvecs.T).reshape(x.shape).to(x.dtype)


def gaussian_marginal_sample(denoiser: GaussianDenoiser, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Map standard normal ``noise`` to a sample of the noisy marginal ``N(mu, Sigma + sigma^2 I)``."""
    s = as_sigma_batch(sigma, noise).to(torch.float64)[:, None]
    flat = noise.reshape(noise.shape[0], -1).to(torch.float64) @ denoiser.eigvecs
    out = denoiser.mean + (flat * (denoiser.eigvals + s**2).sqrt()) @ denoiser.eigvecs.T
    return out.reshape(noise.shape).to(noise.dtype)


def kmeans(data: Tensor, num_clusters: int, seed: int = 0, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007); returns (centres, labels).

    ``data`` is (N, d); the seeding draws from a generator seeded with ``seed``, so fits repeat.
    """
    n = data.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"cannot fit {num_clusters} clusters to {n} points")
    gen = torch.Generator().manual_seed(int(seed))
    x = data.to(torch.float64)
    centres = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, num_clusters):
        dist = torch.cdist(x, centres).min(1).values ** 2
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1 / n)
        pick = torch.multinomial(probs.cpu(), 1, generator=gen).to(x.device)
        centres = torch.cat([centres, x[pick]])
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        for k in range(num_clusters):
            members = x[labels == k]
            if len(members):
                centres[k] = members.mean(0)
        new_labels = torch.cdist(x, centres).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centres, labels


class GaussianMixtureDenoiser(Denoiser):
    """Exact denoiser of the mixture ``sum_k w_k N(m_k, C_k)``.

    Noise keeps it a mixture, ``p_sigma = sum_k w_k N(m_k, C_k + sigma^2 I)``, so
    ``D(x, sigma) = sum_k r_k(x) D_k(x, sigma)`` with ``D_k`` each component's Gaussian denoiser and
    ``r_k`` the posterior responsibilities, computed by log-sum-exp in each component's eigenbasis.

    Args:
        means: (K, d) component means (data of any shape are flattened to d).
        covs: (K, d, d) covariances, or None for isotropic components with standard deviations ``stds``.
        weights: (K,) mixture weights (normalised here); uniform when None.
        stds: (K,) or scalar, used when ``covs`` is None.
    """

    def __init__(
        self,
        means: Tensor,
        covs: Tensor | None = None,
        weights: Tensor | None = None,
        stds: Tensor | float | None = None,
    ):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        num, dim = means.shape
        if covs is None:
            if stds is None:
                raise ValueError("pass either covs or stds")
            var = torch.as_tensor(stds, dtype=torch.float64, device=means.device).expand(num) ** 2
            covs = var[:, None, None] * torch.eye(dim, dtype=torch.float64, device=means.device)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape != (num, dim, dim):
            raise ValueError(f"covariances of shape {tuple(covs.shape)} do not match means {(num, dim)}")
        weights = torch.ones(num) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        lam, U = torch.linalg.eigh((covs + covs.transpose(1, 2)) / 2)
        diagonal = covs.diagonal(dim1=1, dim2=2)
        # Axis-aligned components in few dimensions skip the eigenbasis (see _diagonal_forward).
        self.diagonal = dim <= 16 and bool(torch.equal(covs, torch.diag_embed(diagonal)))
        self.register_buffer("variances", diagonal.clamp(min=0))
        self.register_buffer("means", means)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.register_buffer("eigvals", lam.clamp(min=0))
        self.register_buffer("eigvecs", U)

    @classmethod
    def fit(
        cls, data: Tensor, num_components: int, seed: int = 0, iters: int = 50, ridge: float = 1e-4
    ) -> GaussianMixtureDenoiser:
        """Fit by k-means: each cluster's mean, covariance (+ ``ridge`` I) and share of the points."""
        flat = data.reshape(data.shape[0], -1).to(torch.float64)
        _, labels = kmeans(flat, num_components, seed, iters)
        eye = torch.eye(flat.shape[1], dtype=flat.dtype, device=flat.device)
        means, covs, weights = [], [], []
        for k in range(num_components):
            members = flat[labels == k]
            if len(members) == 0:
                continue
            mean = members.mean(0)
            centred = members - mean
            means.append(mean)
            covs.append(centred.T @ centred / len(members) + ridge * eye)
            weights.append(float(len(members)))
        return cls(torch.stack(means), torch.stack(covs), torch.tensor(weights))

    @torch.no_grad()
    def sample_exact(self, shape: tuple[int, ...], generator=None, device=None) -> Tensor:
        """Draws of the mixture itself (``sampler=exact``): a component by its weight, then its Gaussian."""
        num, dim = self.means.shape
        z = normal_rows(shape[0], dim + 1, generator, self.means.device)
        idx = pick_components(z[:, 0], self.log_weights, num)
        x = self.means[idx].clone()
        for k in idx.unique().tolist():  # one component at a time: never (B, d, d) at once
            rows = idx == k
            x[rows] += (z[rows, 1:] * self.eigvals[k].sqrt()) @ self.eigvecs[k].T
        return x.reshape(shape).to(device or self.means.device)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma_batch(sigma, x).to(torch.float64)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        dim = flat.shape[1]
        if self.diagonal:
            return self._diagonal_forward(flat, sigma).reshape(x.shape).to(x.dtype)
        var = self.eigvals[None] + sigma[:, None, None] ** 2  # (B, K, d)
        # Coordinates of x - m_k in component k's eigenbasis: (B, K, d).
        coeff = torch.einsum("bkd,kde->bke", flat[:, None] - self.means[None], self.eigvecs)
        log_prob = -0.5 * ((coeff**2 / var).sum(-1) + var.log().sum(-1) + dim * math.log(2 * math.pi))
        resp = torch.softmax(self.log_weights + log_prob, dim=1)  # (B, K)
        shrunk = coeff * self.eigvals[None] / var
        denoised = self.means[None] + torch.einsum("bke,kde->bkd", shrunk, self.eigvecs)
        out = (resp[..., None] * denoised).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def _diagonal_forward(self, flat: Tensor, sigma: Tensor) -> Tensor:
        """Axis-aligned components, one coordinate at a time over ``(B, K)`` arrays (several times
        faster than reductions over a short last axis)."""
        if bool((sigma == sigma[0]).all()):  # one noise level (a sampler's step): (1, K) variances
            sigma = sigma[:1]
        s2 = sigma[:, None] ** 2
        var = [self.variances[:, j] + s2 for j in range(flat.shape[1])]  # each (B or 1, K)
        diffs = [flat[:, j, None] - self.means[:, j] for j in range(flat.shape[1])]
        logits = (self.log_weights - 0.5 * sum(v.log() for v in var)).expand_as(diffs[0]).clone()
        for v, diff in zip(var, diffs, strict=True):
            logits.sub_(0.5 * diff.square() / v)  # 2 pi cancels in the softmax
        logits = (logits - logits.amax(1, keepdim=True).detach()).exp()  # the shift cancels below
        norm = logits.sum(1)
        out = torch.empty_like(flat)
        for j, (v, diff) in enumerate(zip(var, diffs, strict=True)):
            out[:, j] = (logits * (self.means[:, j] + diff * (self.variances[:, j] / v))).sum(1) / norm
        return out


class EmpiricalDenoiser(Denoiser):
    """The exact denoiser of the training set itself (a mixture of deltas at the points ``y_i``).

    ``D(x, sigma) = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i``: a model that reaches it
    returns training samples, i.e. memorizes (Wang & Vastola 2024, Sec. 5). The softmax runs over
    chunks of ``chunk_size`` points with a running log-sum-exp, so memory is bounded by
    ``batch x chunk_size``.
    """

    def __init__(self, train: Tensor, chunk_size: int = 4096):
        super().__init__()
        flat = torch.as_tensor(train).reshape(train.shape[0], -1).to(torch.float64)
        self.register_buffer("points", flat)
        self.register_buffer("sq_norms", (flat**2).sum(1))
        self.chunk_size = int(chunk_size)

    @torch.no_grad()
    def sample_exact(self, shape: tuple[int, ...], generator=None, device=None) -> Tensor:
        """Training points drawn uniformly with replacement: the distribution this score is exact for
        (a copy machine; ``sampler=exact``)."""
        z = normal_rows(shape[0], 1, generator, self.points.device)
        idx = pick_components(z[:, 0], None, self.points.shape[0])
        return self.points[idx].reshape(shape).to(device or self.points.device)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma_batch(sigma, x).to(torch.float64)[:, None]
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        x_sq = (flat**2).sum(1, keepdim=True)
        running_max = torch.full_like(x_sq, -math.inf)
        total = torch.zeros_like(x_sq)
        weighted = torch.zeros_like(flat)
        for start in range(0, self.points.shape[0], self.chunk_size):
            pts = self.points[start : start + self.chunk_size]
            dist = (x_sq + self.sq_norms[start : start + self.chunk_size] - 2 * flat @ pts.T).clamp(min=0)
            logits = -dist / (2 * sigma**2)
            new_max = torch.maximum(running_max, logits.max(1, keepdim=True).values)
            rescale = (running_max - new_max).exp()
            w = (logits - new_max).exp()
            total = total * rescale + w.sum(1, keepdim=True)
            weighted = weighted * rescale + w @ pts
            running_max = new_max
        return (weighted / total).reshape(x.shape).to(x.dtype)
