"""Sample grids from fixed seeds, so grids are comparable across steps and across runs."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lightning_diff.callbacks.periodic import PeriodicCallback
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.generation import generate
from lightning_diff.plotting import save_samples_figure


def log_image(trainer: L.Trainer, key: str, path: Path) -> None:
    """Send an image file to every logger that takes images (wandb), at the current global step."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)


class SampleGrid(PeriodicCallback):
    """Every ``every_n_steps`` optimiser steps and at the end of training, draw ``num_samples`` samples
    from seeds ``0 .. num_samples - 1`` (sample ``i`` from seed ``(seed, i)``) with the EMA weights and
    save them as ``samples/step_XXXXXXX.png`` in the run directory (image grid, or a scatter plot
    over the data for vectors); the image also goes to wandb as ``samples/grid``.

    Every rank samples (the EMA network is not wrapped by DDP, so there is no collective); only
    rank 0 writes.
    """

    def __init__(
        self,
        out_dir: str | Path,
        every_n_steps: int = 500,
        num_samples: int = 64,
        seed: int = 0,
        sampler: Sampler | None = None,
    ):
        super().__init__(every_n_steps)
        self.out_dir = Path(out_dir)
        self.num_samples = num_samples
        self.seed = seed
        self.sampler = sampler

    def run(self, trainer: L.Trainer, pl_module) -> Path | None:
        dm = trainer.datamodule
        samples, _ = generate(
            pl_module, range(self.num_samples), tuple(dm.data_shape), self.sampler, seed=self.seed
        )
        if not trainer.is_global_zero:
            return None
        reference = dm.train_tensor()[:2000] if not dm.is_image else None
        path = save_samples_figure(samples, self.out_dir / f"step_{trainer.global_step:07d}.png", reference)
        log_image(trainer, "samples/grid", path)
        return path
