"""The DataModule of the synthetic distributions (:mod:`lightning_diff.data.distributions`): points
drawn once from the seed, then split and batched like any data set."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_diff.data.datamodule import DiffusionDataModule
from lightning_diff.data.distributions import Distribution
from lightning_diff.errors import ConfigError
from lightning_diff.seeding import seeded_generator


class SyntheticDataModule(DiffusionDataModule):
    """``num_samples`` points drawn once from a :class:`Distribution`, then split like any dataset.

    The points are generated from ``seed`` (through its own derived stream), so the same seed gives
    the same data, split and subset. In a Hydra config the distribution is a nested node with its
    own ``_target_``, e.g. ``distribution: {_target_: lightning_diff.data.TwoMoons, noise: 0.1}``.

    Args:
        distribution: the distribution to sample.
        num_samples: total number of points generated before the held-out split.
        **kwargs: the :class:`DiffusionDataModule` arguments (batch_size, num_train, ...).
    """

    def __init__(self, distribution: Distribution, num_samples: int = 10000, **kwargs: Any):
        if not (hasattr(distribution, "sample") and hasattr(distribution, "dim")):
            raise ConfigError(
                f"data.distribution must be a distribution object (a config node with _target_, e.g. "
                f"lightning_diff.data.TwoMoons), got {type(distribution).__name__}"
            )
        if int(num_samples) < 2:
            raise ConfigError(f"data.num_samples must be at least 2, got {num_samples}")
        super().__init__(**kwargs)
        self.distribution = distribution
        self.num_samples = int(num_samples)
        self.name = str(getattr(distribution, "name", type(distribution).__name__.lower()))

    def _load(self) -> Tensor:
        generator = seeded_generator(self.seed, "synthetic")
        samples = self.distribution.sample(self.num_samples, generator)
        expected = (self.num_samples, int(self.distribution.dim))
        if tuple(samples.shape) != expected:
            raise ConfigError(
                f"{self.name}.sample returned shape {tuple(samples.shape)}, expected {expected}"
            )
        return samples.to(torch.float32)

    @property
    def has_log_prob(self) -> bool:
        """Whether the distribution has an exact density."""
        return bool(getattr(self.distribution, "has_log_prob", False))

    def log_prob(self, x: Tensor) -> Tensor | None:
        """Exact log density of ``x`` (flattened per sample) or None if the distribution has none."""
        try:
            return self.distribution.log_prob(x.reshape(x.shape[0], -1))
        except NotImplementedError:
            return None
