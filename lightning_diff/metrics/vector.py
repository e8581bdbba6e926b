"""Sample-quality metrics for low-dimensional vector data (2-D toy distributions and the like).

Each compares generated samples with a fixed reference set (held-out or training data) kept as a
buffer on every rank, never summed across processes: sliced Wasserstein distance, an unbiased
Gaussian-kernel MMD^2, and the total variation between 2-D histograms; and, when the data's density
is known, the mean true log density of the samples. Samples are gathered in rank order (``cat``
states) or reduced as sums, so under DDP ``compute()``, which every rank must call, gives the
single-process value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_diff.metrics.distances import sliced_wasserstein


def _flat64(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


class _AgainstReference(Metric):
    """Keeps a reference set as a non-state buffer and the generated samples as a ``cat`` state."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, reference: Tensor, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("reference", _flat64(reference), persistent=False)
        self.add_state("samples", [], dist_reduce_fx="cat")

    def update(self, samples: Tensor) -> None:
        samples = _flat64(samples)
        if samples.shape[1] != self.reference.shape[1]:
            raise ValueError(
                f"samples have {samples.shape[1]} coordinates, the reference {self.reference.shape[1]}"
            )
        self.samples.append(samples)

    def _all_samples(self) -> Tensor:
        return dim_zero_cat(self.samples)


class SlicedWasserstein(_AgainstReference):
    """Sliced 2-Wasserstein distance to the reference over ``num_projections`` directions drawn from
    a generator seeded with ``seed`` (the same directions at every ``compute()``)."""

    def __init__(self, reference: Tensor, num_projections: int = 256, seed: int = 0, **kwargs):
        super().__init__(reference, **kwargs)
        self.num_projections = num_projections
        self.seed = seed

    def compute(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return sliced_wasserstein(self._all_samples(), self.reference, self.num_projections, generator=gen)


def _gaussian_kernel_sum(a: Tensor, b: Tensor, scales: Sequence[float], chunk_size: int) -> Tensor:
    """Sum over all pairs (a_i, b_j) of ``sum_s exp(-||a_i - b_j||^2 / (2 s^2))``, in row chunks."""
    b_sq = b.pow(2).sum(1)
    total = a.new_zeros(())
    for chunk in a.split(chunk_size):
        d2 = (chunk.pow(2).sum(1, keepdim=True) + b_sq - 2 * chunk @ b.T).clamp(min=0)
        for s in scales:
            total = total + torch.exp(-d2 / (2 * s * s)).sum()
    return total


class MMD(_AgainstReference):
    """Unbiased MMD^2 (Gretton et al. 2012) between the samples and the reference.

    The kernel is a sum of Gaussians ``exp(-||x - y||^2 / (2 h^2))`` with ``h = b * median`` for each
    ``b`` in ``bandwidths``, ``median`` being the median pairwise distance within the reference (over
    at most ``median_points`` of its points, chosen with ``seed``). Fixing the bandwidths from the
    reference alone makes values comparable across models. The reference's own kernel term is
    computed once; pairs are summed ``chunk_size`` rows at a time, so memory stays bounded.
    """

    def __init__(
        self,
        reference: Tensor,
        bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        median_points: int = 2000,
        seed: int = 0,
        chunk_size: int = 2048,
        **kwargs,
    ):
        super().__init__(reference, **kwargs)
        if len(self.reference) < 2:
            raise ValueError("MMD needs at least two reference points")
        gen = torch.Generator().manual_seed(seed)
        subset = self.reference[torch.randperm(len(self.reference), generator=gen)[:median_points]]
        self.median = float(torch.pdist(subset).median())
        if self.median <= 0:
            raise ValueError("the reference's median pairwise distance is zero")
        self.scales = tuple(b * self.median for b in bandwidths)
        self.chunk_size = chunk_size
        self._reference_term: float | None = None

    def _within(self, x: Tensor) -> Tensor:
        """Mean kernel value over pairs of distinct points of x (each diagonal term is len(scales))."""
        m = len(x)
        total = _gaussian_kernel_sum(x, x, self.scales, self.chunk_size)
        return (total - m * len(self.scales)) / (m * (m - 1))

    def compute(self) -> Tensor:
        x, y = self._all_samples(), self.reference
        if len(x) < 2:
            raise ValueError("MMD needs at least two samples")
        if self._reference_term is None:
            self._reference_term = float(self._within(y))
        cross = _gaussian_kernel_sum(x, y, self.scales, self.chunk_size) / (len(x) * len(y))
        return self._within(x) + self._reference_term - 2 * cross


class HistogramTV(Metric):
    """Total variation between histograms of the samples and the reference over the first two
    coordinates (the first one for 1-D data).

    The grid has ``bins`` cells per axis spanning the reference's ``quantiles``, widened on each side
    by ``margin`` times that span, plus one overflow cell for every point outside the grid, so mass
    that leaves the grid still counts. Samples are binned as they come (a ``sum`` state of counts).
    ``TV = 1/2 sum |p - q|``: 0 for identical histograms, 1 for disjoint ones. Binning only merges
    mass, so it is at most the TV between the distributions, plus a positive finite-sample bias of
    order ``sqrt(cells / N)``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        reference: Tensor,
        bins: int = 64,
        quantiles: tuple[float, float] = (0.001, 0.999),
        margin: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        reference = _flat64(reference)
        self.num_axes = min(2, reference.shape[1])
        self.bins = bins
        coords = reference[:, : self.num_axes]
        q = torch.tensor(quantiles, dtype=torch.float64)
        lo, hi = torch.quantile(coords, q, dim=0)
        span = (hi - lo).clamp(min=1e-12)
        self.register_buffer("low", lo - margin * span, persistent=False)
        self.register_buffer("width", span * (1 + 2 * margin), persistent=False)
        num_cells = bins**self.num_axes + 1
        counts = self._bin(reference)
        self.register_buffer("reference_probs", counts.double() / counts.sum(), persistent=False)
        self.add_state("counts", torch.zeros(num_cells, dtype=torch.long), dist_reduce_fx="sum")

    def _bin(self, x: Tensor) -> Tensor:
        """Counts per cell (row-major over the axes), the overflow cell last."""
        coords = _flat64(x)[:, : self.num_axes].to(self.low.device)
        idx = torch.floor((coords - self.low) / self.width * self.bins).long()
        inside = ((idx >= 0) & (idx < self.bins)).all(dim=1)
        flat = torch.zeros(len(x), dtype=torch.long, device=coords.device)
        for axis in range(self.num_axes):
            flat = flat * self.bins + idx[:, axis].clamp(0, self.bins - 1)
        overflow = self.bins**self.num_axes
        flat = torch.where(inside, flat, torch.full_like(flat, overflow))
        return torch.bincount(flat, minlength=overflow + 1)

    def update(self, samples: Tensor) -> None:
        self.counts = self.counts + self._bin(samples).to(self.counts.device)

    def compute(self) -> Tensor:
        total = self.counts.sum()
        if total == 0:
            raise ValueError("no samples to histogram")
        return 0.5 * (self.counts.double() / total - self.reference_probs).abs().sum()


class DataLogLikelihood(Metric):
    """Mean true log density of the samples under the data distribution, where it is known.

    ``log_prob_fn`` maps a batch to per-sample log densities (a data module's ``log_prob``). Values
    below ``min_log_prob`` are raised to it, as in ``evaluate_samples``, so that one sample off the
    support does not make the mean ``-inf``; pass None to keep them. Reduced as a sum and a count.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self, log_prob_fn: Callable[[Tensor], Tensor | None], min_log_prob: float | None = -1e4, **kwargs
    ):
        super().__init__(**kwargs)
        self.log_prob_fn = log_prob_fn
        self.min_log_prob = min_log_prob
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: Tensor) -> None:
        log_prob = self.log_prob_fn(samples)
        if log_prob is None:
            raise ValueError("the data's log density is not known")
        log_prob = log_prob.detach().to(torch.float64).reshape(-1)
        if self.min_log_prob is not None:
            log_prob = log_prob.clamp(min=self.min_log_prob)
        self.total = self.total + log_prob.sum().to(self.total.device)
        self.count = self.count + log_prob.numel()

    def compute(self) -> Tensor:
        return self.total / self.count
