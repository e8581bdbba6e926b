"""Sample-quality and memorization measures."""

from lightning_diff.metrics.distances import moment_errors, nearest_neighbour_ratio, sliced_wasserstein

__all__ = ["moment_errors", "nearest_neighbour_ratio", "sliced_wasserstein"]
