"""The end of a run: its summary, checkpoints as wandb Artifacts, the table of memorized samples,
sampling from a checkpoint stored in wandb, and the notices hidden at the entry points only."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_NET, compose_named
from hydra.utils import instantiate
from omegaconf import OmegaConf
from wandb_records import artifacts

import lightning_diff.checkpoints as checkpoints
import lightning_diff.loggers as loggers
from lightning_diff.checkpoints import fetch_checkpoint, read_checkpoint
from lightning_diff.cli import RANK_ZERO_LOGGERS, third_party_notices_hidden
from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.sample import sample
from lightning_diff.errors import CheckpointError
from lightning_diff.summary import metrics_table

NOTICES = ("litlogger", "anonymous setting", "is deprecated")


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """A tiny moons run through the real command: offline wandb, every checkpoint as an Artifact,
    best weights restored at the end."""
    run_dir = tmp_path_factory.mktemp("loop") / "run"
    overrides = [o for o in TINY if o != "logger=csv"] + TINY_NET
    overrides += [
        "experiment=moons_ddpm",
        "logger=wandb",
        "logger.wandb.mode=offline",
        "logger.wandb.log_model=all",
        "callbacks=with_best_weights",
        "trainer.num_sanity_val_steps=-1",
        "model.optimizer.lr=0.3",  # too large: the start stays the best validation, restored at the end
        "callbacks.evaluation.num_samples=64",
        f"run_dir={run_dir}",
    ]
    env = {**os.environ, "WANDB_DATA_DIR": str(run_dir.parent / "wandb-data")}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_diff.cli.train", *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


def test_training_ends_with_its_answer_and_no_third_party_notices(wandb_run):
    run_dir, output = wandb_run
    summary = output[output.index("ld-train finished") :]
    lines = {line.split()[0]: line.split(None, 1)[1] for line in summary.splitlines()[1:6] if line.strip()}
    assert Path(lines["checkpoint"]) == run_dir / "checkpoints" / "last.ckpt"
    assert Path(lines["samples"]).is_file() and Path(lines["samples"]).parent == run_dir / "samples"
    assert Path(lines["metrics"]) == run_dir / "metrics.json"
    sync = lines["wandb"].split("wandb sync ", 1)[1]
    assert list(Path(sync).parent.glob(Path(sync).name)), sync  # the glob names the offline run
    # every metric of metrics.json is in the table, held-out comparisons first, value as written
    metrics = {
        k.removeprefix("eval/"): v for k, v in json.loads((run_dir / "metrics.json").read_text()).items()
    }
    rows = [line.split() for line in summary.splitlines() if line.startswith("  ") and len(line.split()) >= 2]
    table = {r[0]: r[1] for r in rows if r[0] in metrics}
    assert "fd_raw_vs_heldout" in table and float(table["fd_raw_vs_heldout"]) == pytest.approx(
        metrics["fd_raw_vs_heldout"], rel=1e-3
    )
    names = [r[0] for r in rows if r[0] in metrics]
    assert names.index("fd_raw_vs_heldout") < names.index("fd_raw") < names.index("tv_hist")
    for notice in NOTICES:
        assert notice not in output, notice


def test_every_checkpoint_is_an_artifact_with_its_step_and_aliases(wandb_run):
    run_dir, _ = wandb_run
    records = artifacts(run_dir / "wandb" / "offline-run-*")
    models = [a for a in records if a.type == "model"]
    steps = [json.loads(a.metadata)["step"] for a in models]
    # periodic checkpoints at 3 and 6, and last.ckpt rewritten with the best (step 0) weights at the end
    on_disk = sorted(read_checkpoint(p)["global_step"] for p in (run_dir / "checkpoints").glob("step*.ckpt"))
    assert sorted(set(steps)) == on_disk == [3, 6]
    for artifact, step in zip(models, steps, strict=True):
        assert artifact.name.startswith("model-") and "latest" in artifact.aliases
        assert f"step{step}" in artifact.aliases
        assert [entry.path for entry in artifact.manifest.contents] == ["model.ckpt"]
        assert "train/loss" in json.loads(artifact.metadata)["metrics"]
    final = models[-1]
    assert "best" in final.aliases and json.loads(final.metadata)["best_weights"] is True
    assert json.loads(final.metadata)["original_filename"] == "last.ckpt"
    assert not any("best" in a.aliases for a in models[:-1])


def test_the_memorized_samples_table_matches_a_brute_force_nearest_neighbour(wandb_run):
    run_dir, _ = wandb_run
    (path,) = (run_dir / "wandb").glob("offline-run-*/files/media/table/eval/samples_*.table.json")
    table = json.loads(path.read_text())
    assert table["columns"][:2] == ["sample", "nearest_training"]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    train = datamodule.train_tensor().double()
    col = {name: i for i, name in enumerate(table["columns"])}
    ratios = [row[col["nn1_nn2_ratio"]] for row in table["data"]]
    assert len(ratios) == 64 and ratios == sorted(ratios)  # every sample, most memorized first
    for row in table["data"][:16]:
        x = torch.tensor(row[col["sample"]], dtype=torch.float64)
        d = torch.linalg.vector_norm(train - x, dim=1)
        two = d.topk(2, largest=False)
        assert row[col["training_index"]] == int(two.indices[0])
        assert row[col["nearest_training"]] == pytest.approx(train[two.indices[0]].tolist(), abs=1e-4)
        assert row[col["nn1"]] == pytest.approx(float(two.values[0]), rel=1e-3, abs=1e-5)
        assert row[col["nn1_nn2_ratio"]] == pytest.approx(float(two.values[0] / two.values[1]), rel=1e-3)
        assert row[col["memorized"]] == (row[col["nn1_nn2_ratio"]] < 1 / 3)


class FakeArtifact:
    def __init__(self, source: Path):
        self.source, self.name = source, "model-abc123:v2"

    def download(self, root: str) -> str:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(self.source, Path(root) / "model.ckpt")
        return root


@pytest.fixture
def wandb_api(wandb_run, monkeypatch, tmp_path):
    """wandb's public API answering with the run's last checkpoint (the real one needs a server)."""
    run_dir, _ = wandb_run
    asked = []

    class FakeApi:
        def __init__(self, timeout=None):
            pass

        def artifact(self, name, type=None):
            asked.append((name, type))
            return FakeArtifact(run_dir / "checkpoints" / "last.ckpt")

    import wandb

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setattr(loggers, "has_wandb_key", lambda: True)
    monkeypatch.setattr(loggers, "reachable", lambda host: True)
    monkeypatch.setenv("LD_CACHE_DIR", str(tmp_path / "cache"))
    return asked


def test_sample_and_eval_take_a_checkpoint_stored_in_wandb(wandb_run, wandb_api, tmp_path, caplog):
    run_dir, _ = wandb_run
    name = "wandb:me/lightning_diff/model-abc123:best"
    common = ["num_samples=16", "batch_size=16"]
    stored = sample(compose_named("sample", [f"ckpt={name}", f"out={tmp_path / 'w.npy'}", *common]))
    local = sample(
        compose_named(
            "sample", [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'l.npy'}", *common]
        )
    )
    np.testing.assert_array_equal(stored, local)
    assert wandb_api[0] == ("me/lightning_diff/model-abc123:best", "model")
    path = fetch_checkpoint(name)
    assert (
        path
        == tmp_path
        / "cache"
        / "artifacts"
        / "me"
        / "lightning_diff"
        / "model-abc123-v2"
        / "checkpoints"
        / "model.ckpt"
    )
    with caplog.at_level(logging.INFO, logger="lightning_diff"):
        metrics = evaluate(compose_named("eval", [f"ckpt={name}", "num_samples=64", "batch_size=64"]))
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ld-eval finished"))
    assert name in summary and str(path.parent.parent / "metrics.json") in summary
    assert re.search(rf"fd_raw_vs_heldout\s+{metrics['fd_raw_vs_heldout']:.4g}", summary)


@pytest.mark.parametrize(
    ("ckpt", "key", "message"),
    [
        ("wandb:model-abc:latest", True, "wandb:<entity>/<project>/<artifact>:<alias>"),
        ("wandb:me/proj/model-abc", True, "wandb:<entity>/<project>/<artifact>:<alias>"),
        ("wandb:me/proj/model-abc:latest", False, "wandb login"),
    ],
)
def test_a_wandb_checkpoint_that_cannot_be_fetched_is_one_clear_error(monkeypatch, ckpt, key, message):
    monkeypatch.setattr(loggers, "has_wandb_key", lambda: key)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        fetch_checkpoint(ckpt)


def test_a_failing_wandb_server_is_one_clear_error(monkeypatch):
    import wandb

    class BrokenApi:
        def __init__(self, timeout=None):
            pass

        def artifact(self, name, type=None):
            raise ValueError("artifact 'me/proj/model-abc:latest' not found\nmore detail")

    monkeypatch.setattr(wandb, "Api", BrokenApi)
    monkeypatch.setattr(loggers, "has_wandb_key", lambda: True)
    monkeypatch.setattr(loggers, "reachable", lambda host: True)
    with pytest.raises(
        CheckpointError, match="could not give the artifact .artifact 'me/proj/model-abc:latest' not found.$"
    ):
        fetch_checkpoint("wandb:me/proj/model-abc:latest")
    assert checkpoints.WANDB_PREFIX == "wandb:"


def _warn_from(module: str, category: type[Warning], text: str) -> None:
    warnings.warn_explicit(text, category, filename=f"{module}.py", lineno=1, module=module, registry={})


def test_notices_are_hidden_inside_entry_points_only():
    advert = logging.LogRecord(RANK_ZERO_LOGGERS[0], logging.INFO, "", 0, "Tip: try litlogger", None, None)
    other = logging.LogRecord(RANK_ZERO_LOGGERS[0], logging.INFO, "", 0, "GPU available: False", None, None)
    rank_zero = logging.getLogger(RANK_ZERO_LOGGERS[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with third_party_notices_hidden():
            _warn_from("lightning.pytorch.utilities._pytree", FutureWarning, "library deprecation")
            _warn_from("torch.utils.data", DeprecationWarning, "library deprecation")
            _warn_from("lightning.pytorch.trainer", UserWarning, "a library's real warning")
            _warn_from("lightning_diff.models", DeprecationWarning, "our own deprecation")
            assert not rank_zero.filter(advert) and rank_zero.filter(other)
        _warn_from("torch.utils.data", DeprecationWarning, "after the entry point")
    assert [str(w.message) for w in caught] == [
        "a library's real warning",
        "our own deprecation",
        "after the entry point",
    ]
    assert rank_zero.filter(advert)  # the filter is gone with the block


def test_metrics_table_folds_intervals_and_floors_into_their_rows():
    metrics = {
        "eval/fd_raw": 0.5,
        "eval/fd_raw_vs_heldout": 0.25,
        "eval/fd_raw_vs_heldout_ci_low": 0.125,
        "eval/fd_raw_vs_heldout_ci_high": 0.375,
        "eval/fd_raw_vs_heldout_floor": 0.0625,
        "eval/nfe": 49.0,
        "num_samples": 1000,
        "eval/recall_raw_floor": 0.9,  # a floor without its metric stays a row of its own
    }
    header, *rows = metrics_table(metrics)
    assert header.split()[:2] == ["metric", "value"]
    assert [r.split() for r in rows] == [
        ["fd_raw_vs_heldout", "0.25", "[0.125,", "0.375]", "0.0625"],
        ["fd_raw", "0.5"],
        ["nfe", "49"],
        ["recall_raw_floor", "0.9"],
    ]
