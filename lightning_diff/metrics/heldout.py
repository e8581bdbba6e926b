"""Generated samples against held-out data at equal size, with the score a perfect model would get.

The Frechet distance to the training set rewards reproducing the training set (a copy machine scores
best), and distances between sets of different sizes cannot be compared (the Frechet distance falls
as the number of points grows). Here every comparison is against data the model never saw, with
both sides the same size ``n`` (the smallest of the generated, held-out and training counts; larger
sets are subsampled with a seed, and a small training set, as in a memorization study, sets ``n``
so that the floor is at the same size too), and each value comes with

- its floor: ``n`` training points scored the same way against the same held-out points, what a model
  that samples the data distribution exactly reaches (``<key>_floor``);
- a 95% bootstrap interval (``<key>_ci_low``, ``<key>_ci_high``): both sides resampled with
  replacement ``bootstrap`` times. A resampled set holds about 63% distinct points, which inflates a
  Frechet distance (its covariances lose rank); the interval is therefore the bootstrap
  distribution's 2.5% and 97.5% quantiles shifted by its mean to the estimate (floored at 0). The
  kernel distance's replicates leave out the pairs of a point with its own copies, so they need no
  shift and the plain percentile interval is used.

Values: ``fd_<space>_vs_heldout`` (Frechet distance), ``kid_<space>_vs_heldout`` (unbiased MMD^2 with
KID's cubic kernel, on all ``n`` points), ``precision_<space>`` and ``recall_<space>`` (Kynkaanniemi et
al. 2019: the share of samples inside the held-out set's k-nearest-neighbour balls, and the share of
held-out points inside the samples' balls), and ``heldout_compared`` (``n``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_diff.metrics.distances import nearest_neighbours, random_rows
from lightning_diff.metrics.frechet import (
    chunked_features,
    extract_features,
    feature_space_name,
    frechet_distance,
    frozen,
    polynomial_mmd,
)


def gaussian_fd(x: Tensor, y: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (unbiased covariances)."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    return frechet_distance(x.mean(0), torch.cov(x.T).reshape(d, d), y.mean(0), torch.cov(y.T).reshape(d, d))


def knn_radii(x: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Distance of every point of ``x`` to its ``k``-th nearest other point of ``x``."""
    return nearest_neighbours(x, x, k=k + 1, chunk_size=chunk_size)[0][:, k]


def manifold_coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk_size: int = 1024) -> float:
    """Share of ``queries`` inside at least one ball ``B(support_i, radii_i)``."""
    inside = []
    for chunk in queries.double().split(chunk_size):
        d = torch.cdist(chunk, support.double())
        inside.append((d <= radii.double()[None, :]).any(1))
    return float(torch.cat(inside).double().mean()) if inside else float("nan")


def precision_recall(fake: Tensor, real: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with ``k``-NN balls."""
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


def resampled_mmd(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """The unbiased MMD^2 of the resampled sets ``x[i]`` and ``y[j]`` from the full kernel matrices,
    leaving out the pairs of a point with itself or its copies (which would bias the within-set
    terms upward)."""
    cx = torch.bincount(i, minlength=len(k_xx)).double()
    cy = torch.bincount(j, minlength=len(k_yy)).double()

    def within(k: Tensor, c: Tensor) -> Tensor:
        pairs = c.sum() ** 2 - (c**2).sum()
        return (c @ k @ c - (c**2 * k.diagonal()).sum()) / pairs

    return within(k_xx, cx) + within(k_yy, cy) - 2 * (cx @ k_xy @ cy) / (cx.sum() * cy.sum())


log = logging.getLogger("lightning_diff.metrics")


class HeldoutComparison(Metric):
    """Frechet and kernel distances, precision and recall of samples against held-out data at equal
    size, with floors and bootstrap intervals (see the module docstring).

    Held-out and training features are fixed at construction (every rank holds them); samples'
    features are ``cat`` states gathered in rank order, and every random draw is seeded, so the
    values are the same on 1 and N processes.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        train: Tensor,
        heldout: Tensor,
        feature_extractor: nn.Module | None = None,
        name: str | None = None,
        bootstrap: int = 200,
        nearest_k: int = 3,
        seed: int = 0,
        chunk_size: int = 1024,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(heldout) < 2 or len(train) < 2:
            raise ValueError("held-out comparisons need two or more training and held-out points")
        self.feature_extractor = frozen(feature_extractor)
        self.name = feature_space_name(feature_extractor, name)
        self.bootstrap, self.nearest_k, self.seed, self.chunk_size = (
            int(bootstrap),
            int(nearest_k),
            seed,
            chunk_size,
        )

        def features(x: Tensor) -> Tensor:
            return chunked_features(feature_extractor, x, chunk_size).float()

        self.register_buffer("heldout_features", features(heldout), persistent=False)
        # As many training points as could ever be compared: the floor's draw happens in compute().
        self.num_train = len(train)
        self.register_buffer(
            "train_features", features(random_rows(train, len(heldout), seed)), persistent=False
        )
        self.add_state("features", [], dist_reduce_fx="cat")
        self._said_subsampled = False

    def update(self, samples: Tensor) -> None:
        self.features.append(extract_features(self.feature_extractor, samples).float())

    def _scores(self, side: Tensor, real: Tensor) -> dict[str, float]:
        precision, recall = precision_recall(side, real, self.nearest_k)
        return {
            f"fd_{self.name}_vs_heldout": gaussian_fd(side, real),
            f"kid_{self.name}_vs_heldout": float(polynomial_mmd(real.double(), side.double())),
            f"precision_{self.name}": precision,
            f"recall_{self.name}": recall,
        }

    def _intervals(self, fake: Tensor, real: Tensor, estimates: dict[str, float]) -> dict[str, float]:
        n = len(fake)
        fd_key, kid_key = f"fd_{self.name}_vs_heldout", f"kid_{self.name}_vs_heldout"
        x, y = fake.double(), real.double()
        d = x.shape[1]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1).pow(3) for a, b in ((x, x), (y, y), (x, y)))
        gen = torch.Generator().manual_seed(self.seed)
        fd_draws, kid_draws = [], []
        for _ in range(self.bootstrap):
            i = torch.randint(n, (n,), generator=gen).to(x.device)
            j = torch.randint(n, (n,), generator=gen).to(x.device)
            fd_draws.append(gaussian_fd(x[i], y[j]))
            kid_draws.append(float(resampled_mmd(k_xx, k_yy, k_xy, i, j)))
        fd_low, fd_high = np.percentile(fd_draws, [2.5, 97.5]) - np.mean(fd_draws) + estimates[fd_key]
        kid_low, kid_high = np.percentile(kid_draws, [2.5, 97.5])
        return {
            f"{fd_key}_ci_low": max(float(fd_low), 0.0),
            f"{fd_key}_ci_high": max(float(fd_high), 0.0),
            f"{kid_key}_ci_low": float(kid_low),
            f"{kid_key}_ci_high": float(kid_high),
        }

    def compute(self) -> dict[str, Tensor]:
        fake = dim_zero_cat(self.features)
        held = self.heldout_features
        # Every side the same size: samples, held-out points and the floor's training points.
        n = min(len(fake), len(held), len(self.train_features))
        if n < self.nearest_k + 2:  # too few points for k-NN balls: nothing to report
            return {}
        if n < len(fake) and not self._said_subsampled:
            self._said_subsampled = True
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                log.info(
                    "held-out comparisons (fd_%s_vs_heldout, ...) at %d points a side, the smaller of the "
                    "held-out split (%d) and the training set (%d): %d samples subsampled to it",
                    self.name,
                    n,
                    len(held),
                    self.num_train,
                    len(fake),
                )
        fake, real = random_rows(fake, n, self.seed), random_rows(held, n, self.seed + 1)
        floor_side = random_rows(self.train_features, n, self.seed + 2)
        out = self._scores(fake, real)
        out.update({f"{k}_floor": v for k, v in self._scores(floor_side, real).items()})
        if self.bootstrap > 0:
            out.update(self._intervals(fake, real, out))
        out["heldout_compared"] = float(n)
        device = held.device
        return {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in out.items()}
