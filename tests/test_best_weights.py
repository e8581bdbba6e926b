"""BestWeights: a kernel WPO run ends on the weights of its best validation, start included, and
``last.ckpt`` holds them. The check recomputes the held-out objective of the saved model directly."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate

from lightning_diff.callbacks.best_weights import BestWeights
from lightning_diff.checkpoints import load_model
from lightning_diff.cli.train import train


def _run(tmp_path, extra):
    overrides = [
        "experiment=moons_kernel_wpo",
        "data.num_train=32",
        "trainer.max_steps=40",
        "trainer.val_check_interval=10",
        "trainer.num_sanity_val_steps=-1",
        "callbacks.checkpoint.every_n_train_steps=40",  # written at the final step, before the restore
        *extra,
    ]
    cfg = compose_train(overrides, tmp_path / "run")
    metrics, objects = train(cfg)
    callback = next(c for c in objects["trainer"].callbacks if isinstance(c, BestWeights))
    model, run_cfg = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt", "cpu")
    dm = instantiate(run_cfg.data)
    dm.setup("fit")
    with torch.no_grad():
        objective = (
            model.kernel(model.net).hyvarinen(dm.val_tensor(), model.fit_sigma, exclude_self=True).mean()
        )
    with open(tmp_path / "run" / "csv" / "metrics.csv") as handle:
        logged = [float(r["val/loss"]) for r in csv.DictReader(handle) if r.get("val/loss")]
    return model, callback, float(objective), logged


def test_run_ends_on_its_best_validation(tmp_path):
    model, callback, objective, logged = _run(tmp_path, [])
    assert callback.best == pytest.approx(min(logged), rel=1e-5)
    assert objective == pytest.approx(callback.best, rel=1e-4)  # last.ckpt holds those weights
    assert logged[-1] > callback.best  # on 32 points the fit overfits: its end was worse


def test_a_fit_that_never_improves_ends_at_its_start(tmp_path):
    # A learning rate far too large: every step makes the held-out objective worse, so the restored
    # weights are the start's, the isotropic optimum P = I / h^2.
    model, callback, objective, logged = _run(tmp_path, ["model.optimizer.lr=1.0"])
    assert callback.best_step == 0 and all(v > callback.best for v in logged)
    h = model.initial_bandwidth.item()
    with torch.no_grad():
        prec = model.ema.module.precision_matrices(model.centers.float())
    torch.testing.assert_close(prec, torch.eye(2).expand_as(prec) / h**2, rtol=2e-3, atol=2e-3)
    assert objective == pytest.approx(callback.best, rel=1e-4)  # the sanity check's value, before step 1
