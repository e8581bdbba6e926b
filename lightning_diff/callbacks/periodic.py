"""What the sampling callbacks share: when they run, and how their numbers are published."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_diff.errors import EndOfTrainingError, LightningDiffError
from lightning_diff.metrics.pipeline import write_metrics

log = logging.getLogger(__name__)


def publish_metrics(
    trainer: L.Trainer, named: dict[str, float], metrics_path: str | Path, **extra: Any
) -> None:
    """Send ``named`` to every logger at the global step and to ``trainer.callback_metrics``; rank 0
    also merges them into ``metrics.json``. Call on every rank (loggers are rank-0-only themselves)."""
    for logger in trainer.loggers:
        logger.log_metrics(named, step=trainer.global_step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})
    if trainer.is_global_zero:
        write_metrics(metrics_path, named, step=trainer.global_step, **extra)


class PeriodicCallback(L.Callback):
    """Calls ``run(trainer, pl_module)`` every ``every_n_steps`` optimiser steps (when positive) and
    once at the end of training, never twice at the same step. ``run`` executes on every rank.

    Lightning ends training with the checkpoint callbacks last, after this one. An error of the
    end-of-training ``run`` (a wrong option, a missing weights file) is therefore held until
    ``on_fit_end``, when the final checkpoint is on disk, and raised then with that checkpoint's path:
    a failed evaluation never costs the trained weights.
    """

    def __init__(self, every_n_steps: int = 0):
        self.every_n_steps = every_n_steps
        self._last_step = -1
        self._end_error: Exception | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self._run_once(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        try:
            self._run_once(trainer, pl_module)
        except Exception as error:  # noqa: BLE001 - raised again in on_fit_end, after the checkpoint
            self._end_error = error

    def on_fit_end(self, trainer, pl_module) -> None:
        error, self._end_error = self._end_error, None
        if error is None:
            return
        ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        kept = f"saved {ckpt}" if ckpt else "saved no checkpoint (checkpointing is off)"
        what = f"training reached step {trainer.global_step} and {kept}, but {type(self).__name__} failed"
        if isinstance(error, LightningDiffError):
            again = f"; fix it and evaluate with ld-eval ckpt={ckpt}" if ckpt else ""
            raise EndOfTrainingError(f"{what}: {error}{again}") from error
        log.error("%s at the end of training with the error below", what)
        raise error

    def _run_once(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError
