"""Sample-quality and memorization measures."""

from lightning_diff.metrics.copying import DataCopying
from lightning_diff.metrics.distances import (
    moment_errors,
    nearest_neighbour_ratio,
    nearest_neighbours,
    sliced_wasserstein,
)
from lightning_diff.metrics.frechet import (
    FrechetDistance,
    GaussianStats,
    KernelDistance,
    frechet_distance,
    polynomial_mmd,
)
from lightning_diff.metrics.heldout import HeldoutComparison
from lightning_diff.metrics.memorization import Memorization
from lightning_diff.metrics.score_deviation import ScoreDeviation
from lightning_diff.metrics.vector import MMD, DataLogLikelihood, HistogramTV, SlicedWasserstein

__all__ = [
    "MMD",
    "DataCopying",
    "DataLogLikelihood",
    "FrechetDistance",
    "GaussianStats",
    "HeldoutComparison",
    "HistogramTV",
    "KernelDistance",
    "Memorization",
    "ScoreDeviation",
    "SlicedWasserstein",
    "frechet_distance",
    "moment_errors",
    "nearest_neighbour_ratio",
    "nearest_neighbours",
    "polynomial_mmd",
    "sliced_wasserstein",
]
