"""Lightning's ModelCheckpoint, with ``last.ckpt`` always holding the step ``fit`` ended at."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is written again at the end of ``fit`` when it does not
    hold the final step yet.

    Lightning's ``save_last`` copies every periodic checkpoint to ``last.ckpt`` but writes it at the
    end of training only when no checkpoint at all was saved in that ``fit``. A run of 2500 steps
    with checkpoints every 1000 would keep step 2000 there, so extending it would repeat 500 steps
    and ``ld-sample`` of ``last.ckpt`` would not see the final weights. Any checkpoint written at the
    final step (a periodic one, the preemption callback's) counts as up to date.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._saved_step: int | None = None
        self._best_restored = False
        #: Per written file: step, epoch, the logged metrics and whether it holds restored best
        #: weights; what :class:`~lightning_diff.loggers.RunWandbLogger` puts on its Artifact.
        self.saved_meta: dict[str, dict[str, Any]] = {}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        metrics = {}
        for key, value in trainer.callback_metrics.items():
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                metrics[key] = float(value)
        self.saved_meta[str(filepath)] = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "metrics": metrics,
            "best_weights": self._best_restored,
        }
        super()._save_checkpoint(trainer, filepath)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called for every checkpoint the trainer writes, whichever callback asked for it.
        self._saved_step = trainer.global_step
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def weights_changed(self) -> None:
        """The module's weights changed after the last save (BestWeights restored others): the end of
        ``fit`` writes ``last.ckpt`` again."""
        self._saved_step = None
        self._best_restored = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None or trainer.global_step == 0:
            return
        if self._saved_step != trainer.global_step:
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            self.last_model_path = str(path)  # part of the callback's state, so set before saving
            self._save_checkpoint(trainer, str(path))  # as Lightning saves: the loggers hear of it
