"""Without a held-out split, ``ld-eval`` never lets the training set stand in for it silently.

With ``data.val_fraction=0`` the baselines that score real held-out data (``fd_raw_heldout``,
``sliced_wasserstein_train``) would compare the training set with itself (0 up to rounding), so they
are omitted; the distances whose reference is the held-out split are computed against the training
set and named ``*_vs_train``. With a held-out split everything is reported as before.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import compose_named

from lightning_diff.cli.evaluate import evaluate

HELDOUT_ONLY = {
    "eval/fd_raw_heldout",
    "eval/sliced_wasserstein_train",
    "eval/fd_raw_vs_heldout",
    "eval/fd_raw_vs_heldout_floor",
    "eval/fd_raw_vs_heldout_ci_low",
    "eval/kid_raw_vs_heldout",
    "eval/precision_raw",
    "eval/data_copying_ct",
    "eval/nn1_ratio_to_heldout",
}
HELDOUT_REFERENCED = {"eval/sliced_wasserstein", "eval/mmd", "eval/tv_hist"}
VS_TRAIN = {"eval/sliced_wasserstein_vs_train", "eval/mmd_vs_train", "eval/tv_hist_vs_train"}


@pytest.fixture
def arrays(tmp_path):
    """A 2-D data file and a file of "samples" that are not the data (shifted by 0.5)."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(400, 2)).astype(np.float32)
    samples = (rng.normal(size=(200, 2)) + 0.5).astype(np.float32)
    np.save(tmp_path / "data.npy", data)
    np.save(tmp_path / "samples.npy", samples)
    return tmp_path


def overrides(tmp_path, val_fraction: float, out: str) -> list[str]:
    return [
        f"samples={tmp_path / 'samples.npy'}",
        "data=array",
        f"data.path={tmp_path / 'data.npy'}",
        f"data.val_fraction={val_fraction}",
        f"out={tmp_path / out}",
        f"cache_dir={tmp_path / 'cache'}",
        "kid=false",
    ]


def test_ld_eval_without_heldout_split_omits_or_renames_heldout_metrics(arrays, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_diff"):
        evaluate(compose_named("eval", overrides(arrays, 0.0, "none.json")))
    keys = set(json.loads((arrays / "none.json").read_text()))
    assert not keys & HELDOUT_ONLY, keys & HELDOUT_ONLY
    assert not keys & HELDOUT_REFERENCED, keys & HELDOUT_REFERENCED
    assert keys >= VS_TRAIN
    assert {"eval/fd_raw", "eval/memorized_fraction"} <= keys  # training-set metrics stay
    said = [r.getMessage() for r in caplog.records if "no held-out split" in r.getMessage()]
    assert len(said) == 1 and "data.val_fraction" in said[0] and "sliced_wasserstein_train" in said[0]
    # The renamed distances are real distances to the training set: the shifted samples are far.
    metrics = json.loads((arrays / "none.json").read_text())
    assert metrics["eval/sliced_wasserstein_vs_train"] > 0.2


def test_with_a_heldout_split_every_heldout_metric_is_reported(arrays):
    metrics = evaluate(compose_named("eval", overrides(arrays, 0.25, "split.json")))
    keys = {f"eval/{k}" for k in metrics}
    assert keys >= HELDOUT_ONLY | HELDOUT_REFERENCED
    assert not keys & VS_TRAIN
    # Real held-out data score near 0 against the training set; the shifted samples do not.
    assert metrics["fd_raw_heldout"] > 1e-6 and metrics["fd_raw_heldout"] < metrics["fd_raw"]
    assert metrics["sliced_wasserstein_train"] < metrics["sliced_wasserstein"]
    # 100 held-out points against 200 samples: compared at 100 each; the shifted samples are worse
    # than the floor (training points), and they are no copies (a shift of half a standard
    # deviation barely moves nearest-neighbour distances in 2-D: C_T stays near 0).
    assert metrics["heldout_compared"] == 100
    assert metrics["fd_raw_vs_heldout_ci_low"] > metrics["fd_raw_vs_heldout_floor"]
    assert -3 < metrics["data_copying_ct"] < 3 and metrics["data_copying_cells"] == 2


def test_baselines_draw_real_data_at_random_from_a_file_sorted_by_class(tmp_path):
    """A file sorted by component: a prefix of either split over-weights one blob, a draw does not."""
    rng = np.random.default_rng(1)

    def blobs(n: int) -> np.ndarray:
        return np.concatenate([rng.normal(size=(n, 2)) * 0.5 + [s, 0.0] for s in (-2.0, 2.0)])

    np.save(tmp_path / "data.npy", blobs(1000).astype(np.float32))
    np.save(tmp_path / "samples.npy", rng.permutation(blobs(200)).astype(np.float32))
    metrics = evaluate(compose_named("eval", overrides(tmp_path, 0.25, "sorted.json")))
    # 400 real points against the held-out 500 (or its statistics): random draws give sliced W2
    # 0.11 and Frechet distance 0.007 here, prefixes of the sorted splits 1.77 and 0.30.
    assert metrics["sliced_wasserstein_train"] < 0.5
    assert metrics["fd_raw_heldout"] < 0.1


def test_an_earlier_checkpoint_is_evaluated_beside_the_run_summary_not_over_it(tmp_path):
    """``ld-eval`` of a checkpoint writes the run's metrics.json (what ld-compare reads) only when the
    checkpoint is at least as new as the step that file describes: an earlier checkpoint's metrics go
    to eval/metrics_step<k>.json, so they never stand in for the run's final numbers."""
    from conftest import compose_train

    from lightning_diff.cli.train import train

    run_dir = tmp_path / "run"
    train(compose_train(["data=moons", "trainer.max_steps=6"], run_dir))  # checkpoints at 3 and 6
    summary = run_dir / "metrics.json"
    before = summary.read_bytes()
    assert json.loads(before)["step"] == 6
    common = ["num_samples=40", "num_steps=3", "kid=false"]
    early = evaluate(compose_named("eval", [f"ckpt={run_dir / 'checkpoints' / 'step0000003.ckpt'}", *common]))
    assert summary.read_bytes() == before, "the run's summary is untouched"
    beside = json.loads((run_dir / "eval" / "metrics_step0000003.json").read_text())
    assert beside["step"] == 3 and beside["eval/sliced_wasserstein"] == early["sliced_wasserstein"]
    assert (run_dir / "eval" / "nn_histograms_ld_eval.png").is_file()  # figures stay in eval/
    final = evaluate(compose_named("eval", [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", *common]))
    merged = json.loads(summary.read_text())
    assert merged["step"] == 6 and merged["eval/sliced_wasserstein"] == final["sliced_wasserstein"]
    assert merged["num_samples"] == 40
