"""The evaluation callback gives the same numbers on 2 gloo processes as ld-eval on 1 process."""

from __future__ import annotations

import json

import pytest
from conftest import compose_named, compose_train

from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.train import train
from lightning_diff.metrics.fidelity import save_random_inception


@pytest.mark.ddp
def test_evaluation_on_two_processes_matches_one(tmp_path):
    run_dir = tmp_path / "run"
    weights = save_random_inception(tmp_path / "inception.pth")  # each rank featurises its own block
    inception = [
        "inception.enabled=true",
        f"inception.weights_path={weights}",
        "inception.kid_subset_size=10",
    ]
    overrides = [
        "data=digits",
        "data.num_train=60",  # Inception on the CPU: a small reference set
        "trainer.max_steps=2",
        "trainer.devices=2",
        "trainer.strategy=ddp_spawn",
        "callbacks.evaluation.num_samples=21",  # not a multiple of the world size: uneven shards
        "callbacks.evaluation.kid=true",
        "callbacks.sample_grid.every_n_steps=0",
        "logger=csv",
        *[f"callbacks.evaluation.{option}" for option in inception],
    ]
    train(compose_train(overrides, run_dir))
    two = json.loads((run_dir / "metrics.json").read_text())
    one = evaluate(
        compose_named(
            "eval",
            [
                f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
                "num_samples=21",
                "sample_seed=12345",
                f"out={tmp_path / 'one.json'}",
                f"cache_dir={tmp_path / 'cache'}",
                *inception,
            ],
        )
    )
    assert two["step"] == 2
    for key in (
        "fd_digits_cnn",
        "kid_digits_cnn_mean",
        "memorized_fraction",
        "ratio_mean",
        "sliced_wasserstein",
        "nn1_ratio_to_heldout",
        "fd_digits_cnn_vs_heldout",
        "fd_digits_cnn_vs_heldout_ci_high",
        "kid_digits_cnn_vs_heldout",
        "precision_digits_cnn",
        "recall_digits_cnn",
        "fid_inception",
        "kid_inception_mean",
        "data_copying_ct",  # NaN on both sides with 21 samples (no cell holds 20); finite in test_metrics_ddp
    ):
        assert two[f"eval/{key}"] == pytest.approx(one[key], rel=1e-4, abs=1e-6, nan_ok=True), key
