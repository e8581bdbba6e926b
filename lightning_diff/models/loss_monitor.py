"""The training loss between the device and the loggers: checked for NaN/inf late, logged at logging steps.

A training step's loss stays on the device (reading it would make the host wait for the step to
finish). :class:`LossMonitor` keeps the losses not yet checked and the latest step's loss and
learning rate; the LightningModule feeds it from its hooks and asks it, at the end of each batch,
whether this is a step whose metrics reach the loggers. Public trainer attributes only
(``global_step``, ``log_every_n_steps``, ``should_stop``, ``max_steps``, ``num_training_batches``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Training losses held on the device before they are checked for NaN/inf at the latest.
MAX_UNCHECKED_LOSSES = 100


class LossMonitor:
    """Deferred NaN/inf check and logging decision for a module's training loss."""

    def __init__(self, max_unchecked: int = MAX_UNCHECKED_LOSSES):
        self.max_unchecked = max_unchecked
        self.unchecked: list[tuple[int, Tensor]] = []
        self.step_loss: tuple[Tensor, int] | None = None
        self.step_lr: float | None = None

    def record(self, step: int, loss: Tensor, batch_size: int) -> None:
        """The (detached) loss of the step that ``global_step`` is about to count; checks the
        pending losses once ``max_unchecked`` have piled up."""
        self.unchecked.append((step, loss))
        self.step_loss = (loss, batch_size)
        if len(self.unchecked) >= self.max_unchecked:
            self.check()

    def record_lr(self, lr: float) -> None:
        """The learning rate of the optimiser step being taken (none: gradients only accumulated)."""
        self.step_lr = lr

    def check(self) -> None:
        """Raise FloatingPointError naming the first step whose training loss was NaN or infinite.

        The module calls this at every logging step, before every checkpoint is written, before
        validation and the sampling callbacks, at the end of training, and ``record`` at least every
        ``max_unchecked`` steps. A bad loss therefore stops training within that many steps and never
        reaches a checkpoint, a sample grid or an evaluation.
        """
        pending, self.unchecked = self.unchecked, []
        if not pending:
            return
        finite = torch.isfinite(torch.stack([loss for _, loss in pending])).cpu()
        if bool(finite.all()):
            return
        first = int((~finite).nonzero()[0, 0])
        step, loss = pending[first]
        raise FloatingPointError(
            f"train/loss is {loss.item()} at step {step}: lower model.optimizer.lr or set "
            "trainer.gradient_clip_val; checkpoints written before that step are kept"
        )

    @staticmethod
    def logs_this_step(trainer: Any, batch_idx: int, stepped: bool) -> bool:
        """Whether this batch's metrics reach the loggers, or the batch ends an epoch or training.

        Lightning hands a batch's metrics to the loggers when the number of optimiser steps counting
        this batch (``global_step``, plus one for a batch that only accumulated gradients) is a
        multiple of ``trainer.log_every_n_steps``, or when the trainer is stopping. Only then, and at
        the last batch of an epoch or of training, are train/loss and train/lr logged, so callback
        metrics and the progress bar show the values of the last logging step in between.
        """
        step = trainer.global_step
        counted = step if stepped else step + 1
        return (
            counted % max(1, int(trainer.log_every_n_steps)) == 0
            or trainer.should_stop
            or 0 < trainer.max_steps <= step
            or batch_idx + 1 >= trainer.num_training_batches
        )

    def take(self, trainer: Any, batch_idx: int) -> tuple[Tensor, int, float | None] | None:
        """At the end of a batch: ``(loss, batch_size, lr)`` to log when this is a logging step
        (after checking the pending losses), else None. Forgets the step's values either way."""
        step_loss, lr = self.step_loss, self.step_lr
        self.step_loss = self.step_lr = None
        if step_loss is None or not self.logs_this_step(trainer, batch_idx, stepped=lr is not None):
            return None
        self.check()
        return step_loss[0], step_loss[1], lr
