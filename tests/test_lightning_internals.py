"""The installed Lightning still has every internal that lightning_diff.lightning_internals reads.

Each test fails, rather than the feature degrading silently, when an upgrade moves one of them.
"""

from __future__ import annotations

import signal

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from torch.utils.data import DataLoader

from lightning_diff.lightning_internals import (
    attached_trainer,
    cluster_environment,
    fit_loop_counters,
    slurm_requeue,
)


def cpu_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        self.seen.append(attached_trainer(self))
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_cluster_environment_is_the_one_lightning_selected():
    slurm = SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1)
    assert cluster_environment(cpu_trainer(plugins=[slurm])) is slurm
    assert isinstance(cluster_environment(cpu_trainer()), LightningEnvironment)


def test_slurm_requeue_handler_exists():
    trainer = cpu_trainer()
    assert callable(trainer._signal_connector._slurm_sigusr_handler_fn)
    assert callable(slurm_requeue)


def test_fit_loop_counters_are_found_in_a_real_checkpoint_and_the_trainer_is_attached(tmp_path):
    model = Tiny()
    assert attached_trainer(model) is None
    trainer = cpu_trainer(max_steps=3, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(model, DataLoader(torch.randn(8, 2), batch_size=4))
    assert model.seen and all(t is trainer for t in model.seen)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    counters = fit_loop_counters(torch.load(tmp_path / "c.ckpt", weights_only=False))
    assert counters is not None
    epochs, batches, loop_state = counters
    assert loop_state["_batches_that_stepped"] == 3 and batches["total"]["completed"] == 3
    assert epochs["current"]["completed"] >= 1
