"""Frechet and kernel distances between generated and reference samples in a named feature space.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to Inception-v3 pool
features; KID (Binkowski et al. 2018) is an unbiased MMD^2 with a cubic polynomial kernel. Both are
written here for any feature extractor, and each metric carries the ``name`` of its feature space
so results are labelled with it (``fd_digits_cnn``, ``fd_raw``, ``kid_raw``): a Frechet distance in
raw coordinates or in a small classifier's features is not an FID and must not be reported as one.

Under DDP the states are reduced by torchmetrics inside ``compute()``, which every rank must call.
``FrechetDistance`` reduces sufficient statistics (sums), so its value does not depend on how the
samples were split; ``KernelDistance`` gathers features in rank order, so with contiguous
seed-sharded generation (``lightning_diff.generation.shard_indices``) its random subsets, and hence its
value, equal the single-process ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class GaussianStats(NamedTuple):
    """Mean, unbiased covariance and number of samples of a set of features (float64)."""

    mean: Tensor
    cov: Tensor
    n: int


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix; rounding's negative eigenvalues -> 0."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Squared 2-Wasserstein (Frechet) distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    ``||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^{1/2} C2 C1^{1/2})^{1/2})``.

    The usual form writes the last term ``tr(sqrtm(C1 C2))``. They agree: with S = C1^{1/2},
    C1 C2 = S (S C2) and (S C2) S = S C2 S, and AB and BA have the same eigenvalues, so C1 C2 has the
    eigenvalues of the symmetric PSD matrix S C2 S, all real and >= 0, and the trace of the principal
    square root is the sum of their square roots. Working with S C2 S needs only symmetric
    eigendecompositions (real, stable, no complex parts to discard as with ``scipy.linalg.sqrtm``)
    and holds for singular covariances too (fewer samples than features). Eigenvalues that rounding
    makes slightly negative are clamped to zero. The result can be a rounding error below zero when
    the two Gaussians are the same; it is not clamped.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c, dtype=torch.float64).to(mu1.device) for c in (cov1, cov2))
    mu2 = mu2.to(mu1.device)
    if not (cov1.shape == cov2.shape == (mu1.numel(), mu1.numel()) and mu1.shape == mu2.shape):
        raise ValueError(
            f"shapes do not match: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
            f"covariances {tuple(cov1.shape)}, {tuple(cov2.shape)}"
        )
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt
    return float(value)


def extract_features(extractor: nn.Module | None, x: Tensor) -> Tensor:
    """``extractor(x)`` (or ``x`` itself when None) flattened to ``(N, F)``, without gradients."""
    with torch.no_grad():
        features = x if extractor is None else extractor(x)
    return features.detach().reshape(features.shape[0], -1)


def frozen(extractor: nn.Module | None) -> nn.Module | None:
    """The extractor in eval mode with gradients off (None stays None): metrics only read it."""
    if extractor is not None:
        extractor.eval().requires_grad_(False)
    return extractor


def chunked_features(
    extractor: nn.Module | None, x: Tensor, chunk_size: int, device: torch.device | None = None
) -> Tensor:
    """:func:`extract_features` of ``x``, ``chunk_size`` rows at a time (moved to ``device`` if given)."""
    chunks = [extract_features(extractor, t if device is None else t.to(device)) for t in x.split(chunk_size)]
    return torch.cat(chunks)


def feature_space_name(extractor: nn.Module | None, name: str | None = None) -> str:
    """``name`` if given, else the extractor's ``name`` attribute, else ``"raw"``."""
    if name is not None:
        return name
    return getattr(extractor, "name", "raw") if extractor is not None else "raw"


class FrechetDistance(Metric):
    """Frechet distance between Gaussians fitted to real and generated features (FID's formula).

    ``update(x, real)`` passes a batch through ``feature_extractor`` (flattening only, when None) and
    adds to the side's sufficient statistics: feature sum, sum of outer products (both float64) and
    count, all summed across processes. ``compute()`` fits each side's mean and unbiased (n - 1)
    covariance and returns :func:`frechet_distance` as a float64 scalar tensor.

    ``name`` labels the feature space (default: the extractor's ``name`` attribute, else ``"raw"``);
    ``key`` is the label for results, ``fd_<name>``. ``feature_dim`` defaults to the extractor's
    ``feature_dim`` attribute; without an extractor it is the number of coordinates of the data.

    Reference statistics: with ``reset_real_features=False`` (torchmetrics' FID has the same switch)
    ``reset()`` clears only the generated side, so the training set is passed through the extractor
    once. ``reference_stats()`` returns the real side's (mean, cov, n) to cache on disk, and
    ``set_reference(mean, cov, n)`` loads them back. A loaded reference is not a metric state: every
    rank holds the full statistics and they are never summed across processes (summing them would
    count the reference once per rank); it survives ``reset()`` and replaces the real side until
    ``clear_reference()``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        feature_dim: int | None = None,
        name: str | None = None,
        reset_real_features: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.feature_extractor = frozen(feature_extractor)
        self.name = feature_space_name(feature_extractor, name)
        feature_dim = feature_dim or getattr(feature_extractor, "feature_dim", None)
        if feature_dim is None:
            raise ValueError(
                "FrechetDistance needs feature_dim (the number of features, or of data coordinates when "
                "there is no extractor) to size its statistics"
            )
        self.feature_dim = int(feature_dim)
        self.reset_real_features = reset_real_features
        f = self.feature_dim
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(f, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(f, f, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.register_buffer("ref_mean", None, persistent=False)
        self.register_buffer("ref_cov", None, persistent=False)
        self.ref_n = 0

    @property
    def key(self) -> str:
        return f"fd_{self.name}"

    def update(self, x: Tensor, real: bool) -> None:
        if real and self.ref_mean is not None:
            raise ValueError(
                "a reference is loaded (set_reference); clear_reference() before adding real data"
            )
        features = extract_features(self.feature_extractor, x).to(torch.float64)
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"got {features.shape[1]} features, the metric was built for {self.feature_dim}")
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + features.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + features.T @ features)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + features.shape[0])

    def _side_stats(self, side: str) -> GaussianStats:
        """Statistics of one side from the (already synced) states."""
        if side == "real" and self.ref_mean is not None:
            return GaussianStats(self.ref_mean, self.ref_cov, self.ref_n)
        n = int(getattr(self, f"{side}_n"))
        if n < 2:
            raise ValueError(f"the Frechet distance needs at least two {side} samples, got {n}")
        mean = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mean, mean)) / (n - 1)
        return GaussianStats(mean, (cov + cov.T) / 2, n)

    def compute(self) -> Tensor:
        real, fake = self._side_stats("real"), self._side_stats("fake")
        value = frechet_distance(real.mean, real.cov, fake.mean, fake.cov)
        return torch.tensor(value, dtype=torch.float64, device=self.device)

    def reference_stats(self) -> GaussianStats:
        """The real side's (mean, cov, n). Syncs across processes: call it on every rank."""
        if self.ref_mean is not None:
            return GaussianStats(self.ref_mean.clone(), self.ref_cov.clone(), self.ref_n)
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            stats = self._side_stats("real")
        return GaussianStats(stats.mean.clone(), stats.cov.clone(), stats.n)

    def set_reference(self, mean: Tensor, cov: Tensor, n: int) -> None:
        """Use these real-side statistics (e.g. the cached training set's) from now on, on this rank."""
        mean = torch.as_tensor(mean, dtype=torch.float64, device=self.device).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64, device=self.device)
        if mean.numel() != self.feature_dim or cov.shape != (self.feature_dim, self.feature_dim):
            raise ValueError(
                f"reference of shapes {tuple(mean.shape)}, {tuple(cov.shape)} for {self.feature_dim} features"
            )
        self.ref_mean, self.ref_cov, self.ref_n = mean, cov, int(n)
        self._computed = None

    def clear_reference(self) -> None:
        self.ref_mean, self.ref_cov, self.ref_n = None, None, 0
        self._computed = None

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = {k: getattr(self, k).clone() for k in ("real_sum", "real_outer", "real_n")}
        super().reset()
        for k, v in kept.items():
            setattr(self, k, v)


def polynomial_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 between two sets with the kernel ``k(a, b) = (a.b / d + 1)^3`` (KID's)."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1).pow(3)
    k_yy = (y @ y.T / d + 1).pow(3)
    k_xy = (x @ y.T / d + 1).pow(3)
    m, n = x.shape[0], y.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


class KernelDistance(Metric):
    """Kernel (Inception) distance: unbiased MMD^2 with the cubic kernel ``(x.y / d + 1)^3``.

    Features of both sides are kept (``cat`` states, gathered across processes in rank order).
    ``compute()`` draws ``subsets`` pairs of random subsets of ``subset_size`` real and generated
    features with a generator seeded by ``seed`` and returns the mean and (population) standard
    deviation of their MMD^2 estimates, as Binkowski et al. 2018 and torchmetrics do. When a side has
    fewer than ``subset_size`` samples, the subsets shrink to the smaller side's size. ``key`` is
    ``kid_<name>``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        name: str | None = None,
        subsets: int = 100,
        subset_size: int = 1000,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.feature_extractor = frozen(feature_extractor)
        self.name = feature_space_name(feature_extractor, name)
        self.subsets = subsets
        self.subset_size = subset_size
        self.seed = seed
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    @property
    def key(self) -> str:
        return f"kid_{self.name}"

    def update(self, x: Tensor, real: bool) -> None:
        features = extract_features(self.feature_extractor, x)
        if features.dtype != torch.float64:
            features = features.float()  # kept in float32; the kernels are computed in float64
        (self.real_features if real else self.fake_features).append(features)

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        size = min(self.subset_size, len(real), len(fake))
        if size < 2:
            raise ValueError(
                f"KID needs at least two samples per side, got {len(real)} real, {len(fake)} fake"
            )
        gen = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(self.subsets):
            i = torch.randperm(len(real), generator=gen)[:size].to(real.device)
            j = torch.randperm(len(fake), generator=gen)[:size].to(fake.device)
            scores.append(polynomial_mmd(real[i].double(), fake[j].double()))
        scores = torch.stack(scores)
        return scores.mean(), scores.std(correction=0)
