"""Low-dimensional synthetic distributions, several with exact densities (plain torch; their
DataModule is :mod:`lightning_diff.data.synthetic`).

Synthetic data is where a diffusion model can be checked against the truth: for a Gaussian, a
Gaussian mixture or a checkerboard the exact log density is known, so a model's likelihood or
score can be compared with it; for points on a circle or a sphere embedded in a higher-dimensional
space, generated samples can be checked for lying on the manifold.

Every distribution has ``dim`` (ambient dimension), ``name``, ``sample(n, generator)`` returning a
float32 ``(n, dim)`` tensor that is fully determined by the generator, and ``log_prob(x)`` where a
closed form exists (``NotImplementedError`` otherwise; ``has_log_prob`` says which). Parameters are
kept in float64 so densities are accurate; samples are cast to float32 at the end.

Over 400 lines: nine short distributions with their densities, kept together so that every
``lightning_diff.data.<Name>`` in ``conf/data/`` points into one file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_diff.errors import ConfigError

_LOG_2PI = math.log(2.0 * math.pi)


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def _cholesky(cov: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of a covariance, or ConfigError if it is not symmetric positive definite."""
    if not torch.allclose(cov, cov.T, atol=1e-8, rtol=1e-6):
        raise ConfigError(f"{what} must be symmetric, got {cov.tolist()}")
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ConfigError(f"{what} must be positive definite (all eigenvalues > 0), got {cov.tolist()}")
    return chol


def _gaussian_log_prob(x: Tensor, mean: Tensor, chol: Tensor) -> Tensor:
    """Log density of ``N(mean, chol chol^T)`` at the rows of ``x`` (all float64)."""
    dim = mean.numel()
    centered = (x - mean).T  # (D, N)
    whitened = torch.linalg.solve_triangular(chol, centered, upper=False)
    mahalanobis = whitened.square().sum(dim=0)
    log_det = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return -0.5 * (dim * _LOG_2PI + log_det + mahalanobis)


def _as_float64_rows(x: Tensor, dim: int) -> Tensor:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected points of shape (N, {dim}), got {tuple(x.shape)}")
    return x.to(torch.float64)


def random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    """A random orthogonal ``(dim, dim)`` float64 matrix from the QR decomposition of a Gaussian matrix.

    The signs of R's diagonal are folded into Q so that Q is Haar-distributed and, given the
    generator, unique (QR alone fixes Q only up to column signs).
    """
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


class Distribution:
    """Interface of a synthetic distribution; see the module docstring."""

    dim: int
    name: str = "distribution"

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` samples as a float32 ``(n, dim)`` tensor, determined by ``generator``."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density at the rows of ``x`` ``(N, dim)``, returned in ``x``'s dtype."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form density")

    @property
    def has_log_prob(self) -> bool:
        """Whether :meth:`log_prob` is implemented."""
        return type(self).log_prob is not Distribution.log_prob

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"


class Gaussian(Distribution):
    """A multivariate normal with the given or a seeded random mean and covariance.

    Args:
        dim: dimension; inferred from ``mean``/``cov`` when given, else 2.
        mean: mean vector (list); random ``N(0, I)`` when None.
        cov: covariance (list of lists); when None a random well-conditioned
            ``A A^T / dim + 0.1 I`` with standard normal ``A``, so the eigenvalues stay away from 0.
        seed: seed of the random mean / covariance (sampling uses the generator it is handed).
    """

    name = "gaussian"

    def __init__(
        self,
        dim: int | None = None,
        mean: Sequence[float] | None = None,
        cov: Sequence[Sequence[float]] | None = None,
        seed: int = 0,
    ):
        sizes = {len(mean)} if mean is not None else set()
        if cov is not None:
            sizes.add(len(cov))
        if dim is not None:
            sizes.add(int(dim))
        if len(sizes) > 1:
            raise ConfigError(f"Gaussian dim, mean and cov disagree on the dimension: sizes {sorted(sizes)}")
        self.dim = sizes.pop() if sizes else 2
        if self.dim < 1:
            raise ConfigError(f"Gaussian dim must be at least 1, got {self.dim}")
        generator = _generator(seed)
        if mean is None:
            self.mean = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        else:
            self.mean = torch.tensor(mean, dtype=torch.float64)
            if self.mean.ndim != 1:
                raise ConfigError(f"Gaussian mean must be a flat list of {self.dim} numbers, got {mean}")
        if cov is None:
            a = torch.randn(self.dim, self.dim, generator=generator, dtype=torch.float64)
            self.cov = a @ a.T / self.dim + 0.1 * torch.eye(self.dim, dtype=torch.float64)
        else:
            self.cov = torch.tensor(cov, dtype=torch.float64)
            if self.cov.shape != (self.dim, self.dim):
                raise ConfigError(
                    f"Gaussian cov must be a {self.dim}x{self.dim} list of lists, "
                    f"got shape {tuple(self.cov.shape)}"
                )
        self.chol = _cholesky(self.cov, "Gaussian cov")

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean + z @ self.chol.T).to(torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        x64 = _as_float64_rows(x, self.dim)
        out = _gaussian_log_prob(x64, self.mean.to(x.device), self.chol.to(x.device))
        return out.to(x.dtype)


class GaussianMixture(Distribution):
    """A mixture of Gaussians with explicit components or ``num_components`` placed automatically.

    Args:
        means: component means ``(K, D)`` as lists; when None, ``num_components`` means are placed at
            distance ``radius`` from the origin: equally spaced on a circle in 2-D (the classic
            ring of Gaussians), at seeded random directions in other dimensions.
        stds: isotropic standard deviation per component (a number or a list of K numbers).
        covs: full covariances ``(K, D, D)`` instead of ``stds``.
        weights: mixture weights (normalized here); equal when None.
        num_components, dim, radius, std: the automatic layout when ``means`` is None; ``std`` is
            also the default isotropic std when neither ``stds`` nor ``covs`` is given.
        seed: seed of the random directions (only used when ``means`` is None and ``dim != 2``).
    """

    name = "gmm"

    def __init__(
        self,
        means: Sequence[Sequence[float]] | None = None,
        stds: float | Sequence[float] | None = None,
        covs: Sequence[Sequence[Sequence[float]]] | None = None,
        weights: Sequence[float] | None = None,
        num_components: int = 8,
        dim: int = 2,
        radius: float = 4.0,
        std: float = 0.5,
        seed: int = 0,
    ):
        if means is not None:
            self.means = torch.tensor(means, dtype=torch.float64)
            if self.means.ndim != 2:
                raise ConfigError(
                    f"GaussianMixture means must be a list of K lists of D numbers, got {means}"
                )
        else:
            k, d = int(num_components), int(dim)
            if k < 1 or d < 1:
                raise ConfigError(f"GaussianMixture needs num_components >= 1 and dim >= 1, got {k} and {d}")
            if d == 2:
                angles = 2.0 * math.pi * torch.arange(k, dtype=torch.float64) / k
                directions = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
            else:
                directions = torch.randn(k, d, generator=_generator(seed), dtype=torch.float64)
                directions = directions / directions.norm(dim=1, keepdim=True)
            self.means = float(radius) * directions
        k, self.dim = self.means.shape
        self.num_components = int(k)

        if stds is not None and covs is not None:
            raise ConfigError("GaussianMixture takes either stds or covs, not both: remove one of them")
        if covs is not None:
            self.covs = torch.tensor(covs, dtype=torch.float64)
            if self.covs.shape != (k, self.dim, self.dim):
                raise ConfigError(
                    f"GaussianMixture covs must have shape ({k}, {self.dim}, {self.dim}) to match means, "
                    f"got {tuple(self.covs.shape)}"
                )
        else:
            per_component = torch.as_tensor(std if stds is None else stds, dtype=torch.float64)
            per_component = per_component.expand(k) if per_component.ndim == 0 else per_component
            if per_component.shape != (k,) or bool((per_component <= 0).any()):
                raise ConfigError(
                    f"GaussianMixture stds must be one positive number or {k} positive numbers, got "
                    f"{per_component.tolist()}"
                )
            eye = torch.eye(self.dim, dtype=torch.float64)
            self.covs = per_component.square().reshape(k, 1, 1) * eye
        self.chols = torch.stack(
            [_cholesky(c, f"GaussianMixture covs[{i}]") for i, c in enumerate(self.covs)]
        )

        if weights is None:
            w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            w = torch.tensor(weights, dtype=torch.float64)
            if w.shape != (k,) or bool((w <= 0).any()):
                raise ConfigError(
                    f"GaussianMixture weights must be {k} positive numbers, got {list(weights)}"
                )
        self.weights = w / w.sum()

    @property
    def mean(self) -> Tensor:
        """The mixture's mean ``sum_k w_k mu_k`` (float64), as :class:`Gaussian`'s ``mean``."""
        return self.weights.double() @ self.means.double()

    @property
    def cov(self) -> Tensor:
        """The mixture's covariance ``sum_k w_k (C_k + (mu_k - m)(mu_k - m)^T)`` (float64)."""
        w = self.weights.double()
        centred = self.means.double() - self.mean
        within = torch.einsum("k,kij->ij", w, self.covs.double())
        return within + torch.einsum("k,ki,kj->ij", w, centred, centred)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        offsets = torch.einsum("nij,nj->ni", self.chols[component], z)
        return (self.means[component] + offsets).to(torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        x64 = _as_float64_rows(x, self.dim)
        per_component = torch.stack(
            [
                _gaussian_log_prob(x64, self.means[i].to(x.device), self.chols[i].to(x.device))
                for i in range(self.num_components)
            ],
            dim=1,
        )
        out = torch.logsumexp(per_component + torch.log(self.weights.to(x.device)), dim=1)
        return out.to(x.dtype)


class TwoMoons(Distribution):
    """Two interleaved half circles (scikit-learn's ``make_moons``), standardized per axis.

    Each point picks a moon with probability 1/2 and a uniform angle, so samples are i.i.d.
    ``noise`` is the std of Gaussian noise in the units of the unscaled moons (scikit-learn's
    convention) and is scaled along with them. The standardization uses the exact mean and std of
    the noiseless curve: x has mean 1/2 and variance 3/4; y has mean 1/4 and variance
    ``1/2 - (2/pi)^2 + (2/pi - 1/4)^2``.
    """

    name = "moons"

    def __init__(self, noise: float = 0.1):
        if noise < 0:
            raise ConfigError(f"TwoMoons noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.dim = 2
        two_over_pi = 2.0 / math.pi
        y_var = 0.5 - two_over_pi**2 + (two_over_pi - 0.25) ** 2
        self.center = torch.tensor([0.5, 0.25], dtype=torch.float64)
        self.scale = torch.tensor([math.sqrt(0.75), math.sqrt(y_var)], dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        inner = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        angle = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        outer_xy = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        inner_xy = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
        points = torch.where(inner.unsqueeze(1), inner_xy, outer_xy)
        points = points + self.noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return ((points - self.center) / self.scale).to(torch.float32)


class SwissRoll(Distribution):
    """The 2-D Swiss roll spiral ``t (cos t, sin t)``, ``t ~ U(1.5 pi, 4.5 pi)``, divided by 7.

    ``noise`` is in the units of the unscaled spiral (scikit-learn's convention). The factor 7 is
    the spiral's root-mean-square coordinate (about 6.9), giving roughly unit std per axis.
    """

    name = "swissroll"

    def __init__(self, noise: float = 0.5):
        if noise < 0:
            raise ConfigError(f"SwissRoll noise must be >= 0, got {noise}")
        self.noise = float(noise)
        self.dim = 2

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=generator, dtype=torch.float64))
        points = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
        points = points + self.noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (points / 7.0).to(torch.float32)


class Checkerboard(Distribution):
    """Uniform density on the filled cells of a checkerboard on ``[-side/2, side/2)^2``.

    The square is cut into ``num_squares x num_squares`` cells; cell ``(i, j)`` is filled when
    ``i + j`` is even. The defaults give the usual 8 filled unit cells on ``[-2, 2)^2``, with
    roughly unit std per axis. The density is ``1 / filled area`` on filled cells and 0 elsewhere.
    """

    name = "checkerboard"

    def __init__(self, num_squares: int = 4, side: float = 4.0):
        if int(num_squares) < 2 or side <= 0:
            raise ConfigError(
                f"Checkerboard needs num_squares >= 2 and side > 0, got {num_squares} and {side}"
            )
        self.num_squares = int(num_squares)
        self.side = float(side)
        self.dim = 2
        self.cell = self.side / self.num_squares
        grid = torch.cartesian_prod(torch.arange(self.num_squares), torch.arange(self.num_squares))
        self.filled_cells = grid[grid.sum(dim=1) % 2 == 0]  # (M, 2) integer cell coordinates
        self.area = self.filled_cells.shape[0] * self.cell**2

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        # All cells have the same area, so a uniform cell choice gives a uniform density.
        choice = torch.randint(self.filled_cells.shape[0], (n,), generator=generator)
        within = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        corner = self.filled_cells[choice].to(torch.float64) * self.cell - self.side / 2.0
        return (corner + within * self.cell).to(torch.float32)

    def log_prob(self, x: Tensor) -> Tensor:
        x64 = _as_float64_rows(x, self.dim)
        cell = torch.floor((x64 + self.side / 2.0) / self.cell)
        inside = ((cell >= 0) & (cell < self.num_squares)).all(dim=1)
        filled = inside & (cell.sum(dim=1) % 2 == 0)
        out = torch.full_like(x64[:, 0], -math.inf)
        out[filled] = -math.log(self.area)
        return out.to(x.dtype)


class Rings(Distribution):
    """Concentric noisy circles with radii ``k / num_rings`` (k = 1..num_rings), rescaled.

    A ring is chosen with probability proportional to its radius, so points are spread evenly
    along the total arc length. Radii are then scaled so each axis has unit variance before
    noise; ``noise`` is the std of isotropic Gaussian noise in those output units.
    """

    name = "rings"

    def __init__(self, num_rings: int = 3, noise: float = 0.05):
        if int(num_rings) < 1 or noise < 0:
            raise ConfigError(f"Rings needs num_rings >= 1 and noise >= 0, got {num_rings} and {noise}")
        self.num_rings = int(num_rings)
        self.noise = float(noise)
        self.dim = 2
        radii = torch.arange(1, self.num_rings + 1, dtype=torch.float64) / self.num_rings
        self.ring_probs = radii / radii.sum()
        # Per-axis variance of a point on a circle of radius r at uniform angle is r^2 / 2.
        per_axis_var = (self.ring_probs * radii.square()).sum() / 2.0
        self.radii = radii / torch.sqrt(per_axis_var)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        ring = torch.multinomial(self.ring_probs, n, replacement=True, generator=generator)
        angle = 2.0 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        radius = self.radii[ring]
        points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        points = points + self.noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return points.to(torch.float32)


class _EmbeddedSphere(Distribution):
    """Uniform points on a ``k``-sphere placed in the first ``k + 1`` coordinates, then rotated.

    A sample is ``x = rotation @ p (+ noise)`` where ``p`` lies on the sphere of ``radius`` in the
    first ``k + 1`` coordinates and is zero elsewhere, so ``rotation.T @ x`` undoes the embedding
    and the first ``k + 1`` columns of ``rotation`` span the sphere's subspace. The manifold has no
    density in the ambient space, hence no ``log_prob``.
    """

    intrinsic_dim: int

    def __init__(self, dim: int, radius: float, noise: float, seed: int):
        kind = type(self).__name__
        if int(dim) < self.intrinsic_dim + 1:
            raise ConfigError(
                f"{kind} lives in at least {self.intrinsic_dim + 1} dimensions, got dim={dim}: "
                f"set dim >= {self.intrinsic_dim + 1}"
            )
        if radius <= 0 or noise < 0:
            raise ConfigError(f"{kind} needs radius > 0 and noise >= 0, got {radius} and {noise}")
        self.dim = int(dim)
        self.radius = float(radius)
        self.noise = float(noise)
        self.rotation = random_rotation(self.dim, _generator(seed))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k1 = self.intrinsic_dim + 1
        # A normalized standard Gaussian is uniform on the sphere in any dimension.
        direction = torch.randn(n, k1, generator=generator, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True)
        embedded = torch.zeros(n, self.dim, dtype=torch.float64)
        embedded[:, :k1] = self.radius * direction
        points = embedded @ self.rotation.T
        if self.noise > 0:
            points = points + self.noise * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return points.to(torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, radius={self.radius}, noise={self.noise})"


class Circle(_EmbeddedSphere):
    """A circle of ``radius`` (a 1-D manifold) embedded in ``dim >= 2`` dimensions by a seeded rotation."""

    name = "circle"
    intrinsic_dim = 1

    def __init__(self, dim: int = 2, radius: float = 1.0, noise: float = 0.0, seed: int = 0):
        super().__init__(dim=dim, radius=radius, noise=noise, seed=seed)


class Sphere(_EmbeddedSphere):
    """A 2-sphere of ``radius`` embedded in ``dim >= 3`` dimensions by a seeded rotation."""

    name = "sphere"
    intrinsic_dim = 2

    def __init__(self, dim: int = 3, radius: float = 1.0, noise: float = 0.0, seed: int = 0):
        super().__init__(dim=dim, radius=radius, noise=noise, seed=seed)
