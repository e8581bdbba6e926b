"""The ``ODELikelihood`` callback: held-out NLL through the probability-flow ODE during training
(the computation is :mod:`lightning_diff.metrics.likelihood`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lightning_diff.callbacks.periodic import PeriodicCallback, publish_metrics
from lightning_diff.generation import gather_shards, shard_indices
from lightning_diff.metrics.likelihood import heldout_data, likelihood_metrics, log_likelihoods


class ODELikelihood(PeriodicCallback):
    """Log the held-out NLL (``eval/bits_per_dim`` or ``eval/nll_nats_per_dim``) and its evaluations.

    Runs at the end of training and, if ``every_n_steps > 0``, periodically, on ``num_samples``
    held-out samples (a fixed random draw) with the EMA weights. The samples are split over the
    ranks in blocks of indices (the last block padded with repeats), every rank integrates its block and joins
    the gather, and only rank 0 writes ``metrics.json``. The remaining arguments go to
    :func:`~lightning_diff.diffusion.log_likelihood.ode_log_likelihood`.
    """

    def __init__(
        self,
        metrics_path: str | Path,
        num_samples: int = 256,
        every_n_steps: int = 0,
        seed: int = 12345,
        batch_size: int = 256,
        **options: Any,
    ):
        super().__init__(every_n_steps)
        self.metrics_path = Path(metrics_path)
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.options = options

    def run(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        dm = trainer.datamodule
        data = heldout_data(dm, self.num_samples)
        n = len(data)
        rows = shard_indices(n, trainer.global_rank, trainer.world_size)
        logp, nfe = log_likelihoods(
            pl_module, data[rows.start : rows.stop], rows, self.seed, self.batch_size, **self.options
        )
        logp = gather_shards(pl_module, logp, n, trainer.world_size)
        nfe = gather_shards(pl_module, nfe, n, trainer.world_size)
        metrics = likelihood_metrics(logp, nfe, tuple(dm.data_shape))
        publish_metrics(
            trainer, {f"eval/{k}": v for k, v in metrics.items()}, self.metrics_path, likelihood_samples=n
        )
        return metrics
