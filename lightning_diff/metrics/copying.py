"""The data-copying test of Meehan, Chaudhuri & Dasgupta (AISTATS 2020).

A model copies when its samples lie closer to the training set than fresh data from the same
distribution do. The test compares, within cells of the space, two sets of nearest-training-neighbour
distances: those of generated samples and those of held-out points.

- Cells: k-means on the training set (in the metric's space), every point assigned to its nearest
  centre.
- Per cell ``c``: the Mann-Whitney statistic ``U_c`` of the generated distances against the held-out
  ones (pairs in which the generated distance is the larger, ties counted half), Z-scored under the
  null of exchangeable distances: ``Z_c = (U_c - m n / 2) / sqrt(m n (m + n + 1) / 12)`` with ``m``
  generated and ``n`` held-out points in the cell. Negative: the generated points are the closer.
- ``C_T``: the average of ``Z_c`` over the cells that hold at least ``min_cell_samples`` generated
  points, weighted by the held-out share of each cell (the paper's ``P_n(pi)``; its ``tau`` is
  ``min_cell_samples / m``). Cells with fewer generated points are left out, as the paper does, since
  their Z-scores are unreliable; ``data_copying_cells`` says how many took part.

Under the null each ``Z_c`` is about standard normal and ``C_T`` has mean 0 and a standard deviation
at most 1; the paper reads ``C_T < -3`` as data copying. A model that under-fits (samples far from
every training point) scores positive.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_diff.metrics.distances import nearest_neighbours
from lightning_diff.metrics.frechet import chunked_features, extract_features, feature_space_name, frozen

COPYING_THRESHOLD = -3.0


def mann_whitney_u(x: Tensor, y: Tensor) -> Tensor:
    """The Mann-Whitney statistic of ``x`` against ``y``: the number of pairs ``(i, j)`` with
    ``x_i > y_j``, ties counted one half (``scipy.stats.mannwhitneyu(x, y).statistic``)."""
    y_sorted = y.double().sort().values
    below = torch.searchsorted(y_sorted, x.double(), right=False)
    not_above = torch.searchsorted(y_sorted, x.double(), right=True)
    return (below + 0.5 * (not_above - below)).sum().double()


def z_scored_u(x: Tensor, y: Tensor) -> float:
    """``U`` of ``x`` against ``y`` minus its null mean, over its null standard deviation."""
    m, n = len(x), len(y)
    mean = m * n / 2
    std = math.sqrt(m * n * (m + n + 1) / 12)
    return (float(mann_whitney_u(x, y)) - mean) / std


def default_num_cells(num_heldout: int, num_train: int) -> int:
    """About 50 held-out points a cell, at most 50 cells and never more cells than training points.

    ``C_T`` averages per-cell Z-scores, each of which grows like the square root of its cell's
    counts, so more cells mean a weaker test; fewer cells pool regions where a model might copy
    in one and under-fit in another (the reason for the cells)."""
    return max(1, min(50, num_heldout // 50, num_train))


class DataCopying(Metric):
    """The data-copying statistic ``C_T`` of generated samples (see the module docstring).

    The training and held-out sets (their features, with a ``feature_extractor``) are fixed at
    construction: every rank holds both and computes the k-means cells (scikit-learn, seeded) and the
    held-out distances itself. ``update(samples)`` stores each sample's nearest-training-neighbour
    distance and cell (``cat`` states), so the gathered statistic is the same on 1 and N processes.

    Args:
        train, heldout: the training set and data the model never saw, in data space.
        feature_extractor: the space to measure in (None: the data's coordinates or pixels).
        name: the space's name in logs (default: the extractor's).
        num_cells: k-means cells; None: :func:`default_num_cells`.
        min_cell_samples: generated points a cell needs to count (the paper's ``tau * m``).
        seed: the k-means seed.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        train: Tensor,
        heldout: Tensor,
        feature_extractor: nn.Module | None = None,
        name: str | None = None,
        num_cells: int | None = None,
        min_cell_samples: int = 20,
        seed: int = 0,
        chunk_size: int = 1024,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(train) < 2 or len(heldout) < 2:
            raise ValueError(
                f"the data-copying test needs two or more training and held-out points, got {len(train)} and "
                f"{len(heldout)}; set data.val_fraction above 0"
            )
        if min_cell_samples < 1:
            raise ValueError(f"min_cell_samples={min_cell_samples} must be at least 1")
        self.feature_extractor = frozen(feature_extractor)
        self.name = feature_space_name(feature_extractor, name)
        self.chunk_size = chunk_size
        self.min_cell_samples = int(min_cell_samples)
        train_f = self._features(train)
        held_f = self._features(heldout)
        self.num_cells = int(num_cells or default_num_cells(len(held_f), len(train_f)))
        from sklearn.cluster import KMeans

        kmeans = KMeans(n_clusters=self.num_cells, n_init=4, random_state=seed)
        kmeans.fit(train_f.double().cpu().numpy())
        centres = torch.as_tensor(kmeans.cluster_centers_, dtype=train_f.dtype, device=train_f.device)
        self.register_buffer("train_features", train_f, persistent=False)
        self.register_buffer("centres", centres, persistent=False)
        self.register_buffer("heldout_cell", self._cells(held_f), persistent=False)
        self.register_buffer("heldout_nn1", self._nn1(held_f), persistent=False)
        self.add_state("nn1", [], dist_reduce_fx="cat")
        self.add_state("cell", [], dist_reduce_fx="cat")

    def _features(self, x: Tensor) -> Tensor:
        return chunked_features(self.feature_extractor, x, self.chunk_size).float()

    def _cells(self, features: Tensor) -> Tensor:
        return nearest_neighbours(features, self.centres, k=1, chunk_size=self.chunk_size)[1][:, 0]

    def _nn1(self, features: Tensor) -> Tensor:
        return nearest_neighbours(features, self.train_features, k=1, chunk_size=self.chunk_size)[0][:, 0]

    def update(self, samples: Tensor) -> None:
        features = extract_features(self.feature_extractor, samples).float()
        self.nn1.append(self._nn1(features))
        self.cell.append(self._cells(features))

    def per_cell(self) -> dict[str, np.ndarray]:
        """Per cell: ``z`` (NaN where it does not count), ``generated`` and ``heldout`` counts,
        ``used`` (the cells that enter ``C_T``). Reads the states as they are; see :meth:`cells`."""
        nn1, cell = dim_zero_cat(self.nn1), dim_zero_cat(self.cell).long()
        z = np.full(self.num_cells, np.nan)
        generated = torch.bincount(cell, minlength=self.num_cells).cpu().numpy()
        heldout = torch.bincount(self.heldout_cell, minlength=self.num_cells).cpu().numpy()
        used = (generated >= self.min_cell_samples) & (heldout > 0)
        for c in np.flatnonzero(used):
            z[c] = z_scored_u(nn1[cell == c], self.heldout_nn1[self.heldout_cell == c])
        return {"z": z, "generated": generated, "heldout": heldout, "used": used}

    def cells(self) -> dict[str, np.ndarray]:
        """:meth:`per_cell` of the gathered samples: a collective under DDP, call on every rank."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self.per_cell()

    def sample_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """The cell of every sample (update order) and each cell's ``z`` (NaN where it does not
        count), gathered: a collective under DDP, call on every rank."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            cell = dim_zero_cat(self.cell).long().cpu().numpy()
            return cell, self.per_cell()["z"]

    def compute(self) -> dict[str, Tensor]:
        cells = self.per_cell()
        used = cells["used"]
        weights = cells["heldout"][used].astype(np.float64)
        ct = float(np.sum(weights * cells["z"][used]) / weights.sum()) if used.any() else math.nan
        device = self.heldout_nn1.device
        return {
            "data_copying_ct": torch.tensor(ct, dtype=torch.float64, device=device),
            "data_copying_cells": torch.tensor(float(used.sum()), dtype=torch.float64, device=device),
        }
