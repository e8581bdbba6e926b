"""Sample and evaluate during or after training; the latest numbers also go to ``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_diff.callbacks.periodic import PeriodicCallback, publish_metrics
from lightning_diff.callbacks.sample_grid import log_image
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.generation import gather_shards, generate, shard_indices
from lightning_diff.metrics.pipeline import (
    build_inception,
    build_suite,
    memorization_rows,
    require_samples,
    save_memorization_figures,
    wandb_table,
)


class SampleEvaluation(PeriodicCallback):
    """Draw ``num_samples`` samples with the EMA weights and evaluate them (``lightning_diff.metrics.suite``):
    Frechet and kernel distances in a feature space, memorization, sliced Wasserstein distance, and
    for vectors MMD, histogram TV and the true log density; optionally Inception metrics.

    Runs at the end of training and every ``every_n_steps`` if positive. Sample ``i`` comes from the
    seed ``(seed, i)`` and each rank draws a contiguous block of indices, so the samples, and every
    metric (torchmetrics states reduced across ranks), do not depend on the number of processes.
    Every rank samples, updates and computes; rank 0 alone writes ``metrics.json`` and figures
    (histograms of the nearest-neighbour ratio and distance; generated images above their nearest
    training images), and sends them to the loggers. With a wandb logger, ``table_rows`` of the most
    memorized samples also go to wandb as the table ``eval/samples`` (each beside its nearest
    training sample, with its distance ratio and copying cell: sortable in the UI); 0 turns it off.
    """

    def __init__(
        self,
        metrics_path: str | Path,
        num_samples: int = 1000,
        every_n_steps: int = 0,
        seed: int = 12345,
        batch_size: int = 500,
        sampler: Sampler | None = None,
        feature_space: str = "auto",
        kid: bool = True,
        inception: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        figures_dir: str | Path | None = None,
        num_pairs: int = 8,
        table_rows: int = 256,
    ):
        super().__init__(every_n_steps)
        self.metrics_path = Path(metrics_path)
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.sampler = sampler
        self.feature_space = feature_space
        self.kid = kid
        self.inception = dict(inception) if inception else None
        self.cache_dir = cache_dir
        self.figures_dir = Path(figures_dir) if figures_dir else self.metrics_path.parent / "eval"
        self.num_pairs = num_pairs
        self.table_rows = table_rows
        self._suite = None
        self._inception = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before training, not after it: too few samples, a missing weights file, a failed download.
        # Every rank then has samples to evaluate; the Inception network loads once.
        n, processes = self.num_samples, trainer.world_size
        problem = f"callbacks.evaluation.num_samples={n} is too few on {processes} process(es): give "
        require_samples(n, processes, problem)
        if self._inception is None:
            self._inception = build_inception(trainer.datamodule, self.inception, self.cache_dir)

    def suite(self, trainer, device: torch.device):
        if self._suite is None:
            cache = self.cache_dir if trainer.is_global_zero else None  # one writer of the cache
            self._suite = build_suite(
                trainer.datamodule,
                self.feature_space,
                self.kid,
                self.seed,
                cache,
                trainer.global_rank,
                trainer.world_size,
            ).to(device)
        self._suite.reset()
        return self._suite

    def inception_metrics(self, device: torch.device):
        """The Inception metrics built in ``setup``, on ``device`` and emptied; None when off."""
        if self._inception is not None:
            self._inception = self._inception.to(device)
            self._inception.reset()
        return self._inception

    def run(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        dm = trainer.datamodule
        suite = self.suite(trainer, pl_module.device)
        indices = shard_indices(self.num_samples, trainer.global_rank, trainer.world_size)
        local, nfe = generate(
            pl_module, indices, tuple(dm.data_shape), self.sampler, self.seed, self.batch_size
        )
        suite.update(local)
        metrics = suite.compute()
        metrics.update(suite.baselines(self.num_samples))
        samples = gather_shards(pl_module, local, self.num_samples, trainer.world_size).cpu()
        tag = f"step_{trainer.global_step:07d}"
        figures = save_memorization_figures(
            suite,
            samples,
            dm.train_tensor(),
            self.figures_dir,
            tag,
            self.num_pairs,
            write=trainer.is_global_zero,
        )
        inception = self.inception_metrics(pl_module.device)
        if inception is not None:  # each rank featurises its own block; compute gathers them
            inception.update(local)
            metrics.update(inception.compute())
        metrics["nfe"] = float(nfe)
        publish_metrics(
            trainer,
            {f"eval/{k}": v for k, v in metrics.items()},
            self.metrics_path,
            num_samples=self.num_samples,
        )
        if trainer.is_global_zero:
            for path in figures:
                log_image(trainer, f"eval/{path.stem.removesuffix('_' + tag)}", path)
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers and self.table_rows > 0:  # the same on every rank: the rows are a collective
            rows = memorization_rows(suite, samples, dm.train_tensor(), self.table_rows)
            if trainer.is_global_zero:
                for lg in wandb_loggers:
                    lg.log_metrics({"eval/samples": wandb_table(rows)}, step=trainer.global_step)
        return metrics
