"""Two gloo processes train like one: the same global batches and noise, gradients averaged."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import compose_train
from PIL import Image

from lightning_diff.checkpoints import read_checkpoint
from lightning_diff.cli.train import train

BASE = [
    "data=moons",
    "data.num_samples=400",  # 360 training points: 11 global batches of 32 per epoch
    "data.batch_size=32",
    "trainer.max_steps=14",  # crosses an epoch end
    "trainer.deterministic=true",
    "trainer.val_check_interval=7",
    "callbacks.checkpoint.every_n_train_steps=7",
    "callbacks.sample_grid.every_n_steps=0",  # one grid, at the end
    "callbacks.sample_grid.num_samples=16",
    "callbacks.evaluation.num_samples=8",
    "model.ema_decay=0.9",
]


# What "the same" means between process counts: float reduction order differs, nothing else.
LOSS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
WEIGHT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _losses(run_dir) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_match_one_for_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(compose_train(BASE, one))
    train(compose_train(BASE + ["trainer.devices=2", "trainer.strategy=ddp_spawn"], two))
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(14))
    # Per-step loss of the global batch: equal up to float reduction order.
    np.testing.assert_allclose([b[s] for s in range(14)], [a[s] for s in range(14)], **LOSS_TOLERANCE)
    ca, cb = (read_checkpoint(d / "checkpoints" / "last.ckpt") for d in (one, two))
    for key, value in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][key], value, **WEIGHT_TOLERANCE, msg=key)
    assert len(cb["rng_states"]) == 2, "one RNG state per rank"
    grid_a, grid_b = (np.asarray(Image.open(d / "samples" / "step_0000014.png")) for d in (one, two))
    assert np.array_equal(grid_a, grid_b)
