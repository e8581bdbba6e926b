"""Sample and evaluate during or after training; the latest numbers also go to ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.metrics.evaluate import evaluate_samples
from lightning_diff.sampling import generate, shard_indices


def write_metrics(path: str | Path, metrics: dict[str, float], **extra) -> Path:
    """Merge ``metrics`` into the JSON file at ``path`` (created if missing); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(extra)
    current.update(metrics)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


class SampleEvaluation(L.Callback):
    """Draw ``num_samples`` samples (sharded by seed over the ranks, gathered) and compare them with
    the held-out data: sliced Wasserstein distance, moment errors, memorized fraction, and the true
    log density where the data's is known. Logged as ``eval/*`` and written to ``metrics.json``.

    Runs at the end of training and, if ``every_n_steps > 0``, periodically. Every rank samples and
    joins the gather; only rank 0 writes.
    """

    def __init__(
        self,
        metrics_path: str | Path,
        num_samples: int = 1000,
        every_n_steps: int = 0,
        seed: int = 12345,
        batch_size: int = 500,
        sampler: Sampler | None = None,
    ):
        self.metrics_path = Path(metrics_path)
        self.num_samples = num_samples
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.batch_size = batch_size
        self.sampler = sampler
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        self._last_step = trainer.global_step
        dm = trainer.datamodule
        indices = shard_indices(self.num_samples, trainer.global_rank, trainer.world_size)
        local, nfe = generate(
            pl_module, indices, tuple(dm.data_shape), self.sampler, self.seed, self.batch_size
        )
        gathered = pl_module.all_gather(local)
        samples = (
            gathered.reshape(-1, *local.shape[1:])[: self.num_samples] if trainer.world_size > 1 else local
        )
        metrics = evaluate_samples(samples, dm.train_tensor(), dm.val_tensor(), dm.log_prob, seed=self.seed)
        metrics["nfe"] = float(nfe)
        named = {f"eval/{k}": v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(named, step=trainer.global_step)
        # Also visible to code reading trainer.callback_metrics (train() returns them).
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})
        if trainer.is_global_zero:
            write_metrics(self.metrics_path, named, step=trainer.global_step, num_samples=self.num_samples)
        return metrics
