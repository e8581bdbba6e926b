"""Training that ends on the weights of its best validation, for objectives that overfit.

The kernel WPO family's ``val/loss`` is its own objective on held-out points. On small training sets
the precision field overfits: the training objective keeps falling while the held-out one rises from
the first steps (README, "Kernel WPO fitted and sampled exactly"). :class:`BestWeights` keeps a copy
of the weights (raw and EMA) at the lowest ``val/loss`` seen, the sanity-check validation before the
first step included, and puts them back when training ends, before the callbacks that sample and
evaluate the model run their end-of-training pass; ``last.ckpt`` is then written again with them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L

from lightning_diff.callbacks.checkpoint import RunCheckpoint
from lightning_diff.errors import ConfigError

log = logging.getLogger(__name__)


class BestWeights(L.Callback):
    """Keep the weights of the best ``monitor`` value; restore them at the end of ``fit``.

    Args:
        monitor: a logged validation metric.
        mode: ``min`` or ``max``.

    The start counts when the trainer's sanity check covers the whole validation set
    (``trainer.num_sanity_val_steps=-1``): a fit that never improves on its start ends there. The
    best value and its step are logged as ``<monitor>_best`` and ``<monitor>_best_step``, and kept in
    checkpoints with the weights, so a resumed run restores the same ones. The end-of-fit checkpoint
    holds the best weights as the model's (what ``ld-sample`` and ``ld-eval`` read) and the weights
    training reached in this callback's state: a run extended with ``resume`` continues from those,
    and ends as a run straight to the new step count would.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ConfigError(f"callbacks.best_weights.mode={mode!r}: use min or max")
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_step: int | None = None
        self.weights: dict[str, Any] | None = None
        self.final_weights: dict[str, Any] | None = None  # set when the best replaced them at the end

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)) or not self._better(float(value)):
            return
        self.best, self.best_step = float(value), trainer.global_step
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.weights is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{self.monitor}_best": self.best, f"{self.monitor}_best_step": self.best_step},
                step=trainer.global_step,
            )
        if self.best_step == trainer.global_step:
            return
        # The weights training reached go into the end-of-fit checkpoint too, so that extending the
        # run (resume) continues from them rather than from the best ones.
        self.final_weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(self.weights)
        log.info(
            "restored the weights of step %d (%s %.4g, the best validation) at the end of training",
            self.best_step,
            self.monitor,
            self.best,
        )
        for callback in trainer.callbacks:  # last.ckpt is written again, with these weights
            if isinstance(callback, RunCheckpoint):
                callback.weights_changed()

    def state_dict(self) -> dict[str, Any]:
        state = {"best": self.best, "best_step": self.best_step, "weights": self.weights}
        if self.final_weights is not None:
            state["final_weights"] = self.final_weights
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_step = state_dict["best"], state_dict["best_step"]
        self.weights = state_dict["weights"]
        self.final_weights = None

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Resuming from a checkpoint whose weights are the restored best ones: training continues
        # from the weights it had reached (Lightning restores the optimiser state after this).
        final = (checkpoint.get("callbacks") or {}).get(self.state_key, {}).get("final_weights")
        if final is not None:
            pl_module.load_state_dict(final)
