"""Exact resume: stopping at step k and resuming to n ends where an uninterrupted run to n ends."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from conftest import compose_train

from lightning_diff.checkpoints import read_checkpoint
from lightning_diff.train import train

# 90 training points in global batches of 32: 2 steps per epoch, so 12 steps cross 5 epoch ends.
EXACT = [
    "data=moons",
    "data.num_samples=100",
    "data.batch_size=32",
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.evaluation.num_samples=8",
    "model.ema_decay=0.9",
]


def _csv_rows(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train_losses(run_dir) -> dict[int, float]:
    rows = [r for r in _csv_rows(run_dir) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), f"steps repeat or go back: {steps}"
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(compose_train(EXACT + ["trainer.max_steps=12"], run_dir))
    return run_dir


@pytest.mark.parametrize("k", [5, 4], ids=["mid_epoch", "epoch_end"])
def test_stop_and_resume_is_bit_exact(tmp_path, uninterrupted, k):
    run_dir = tmp_path / "run"
    _, first = train(compose_train(EXACT + [f"trainer.max_steps={k}"], run_dir))
    assert first["trainer"].global_step == k
    _, second = train(compose_train(EXACT + ["trainer.max_steps=12", "resume=auto"], run_dir))
    assert second["trainer"].global_step == 12
    a = read_checkpoint(uninterrupted / "checkpoints" / "last.ckpt")
    b = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    _assert_same_state(a, b)
    assert any(k.startswith("ema.") for k in a["state_dict"])
    # The position in the data order travels in the checkpoint: epoch 5 (0-based), both its batches.
    assert a["SyntheticDataModule"] == b["SyntheticDataModule"] == {"epoch": 5, "batches": 2}
    assert len(b["rng_states"]) == 1 and {"torch", "numpy", "python"} <= set(b["rng_states"][0])
    losses_a, losses_b = _train_losses(uninterrupted), _train_losses(run_dir)
    assert sorted(losses_a) == sorted(losses_b) == list(range(12))
    for step in range(12):
        assert losses_a[step] == losses_b[step], step


def test_resume_after_a_kill_supersedes_csv_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed at step 8 whose last checkpoint is at step 4 (emulated by putting the step-4 file
    back as last.ckpt): resuming keeps the rows before step 4 and logs steps 4.. once each."""
    run_dir = tmp_path / "run"
    base = EXACT + ["callbacks.checkpoint.every_n_train_steps=4", "trainer.val_check_interval=2"]
    train(compose_train(base + ["trainer.max_steps=8"], run_dir))
    ckpts = run_dir / "checkpoints"
    (ckpts / "last.ckpt").write_bytes((ckpts / "step0000004.ckpt").read_bytes())
    assert max(int(r["step"]) for r in _csv_rows(run_dir)) == 8
    _, resumed = train(compose_train(base + ["trainer.max_steps=10", "resume=auto"], run_dir))
    assert resumed["trainer"].global_step == 10
    assert sorted(_train_losses(run_dir)) == list(range(10))
    rows = _csv_rows(run_dir)
    for key in ("train/loss", "val/loss", "train/lr"):
        steps = [int(r["step"]) for r in rows if r.get(key)]
        assert steps == sorted(set(steps)), (key, steps)
    # Validation after step s is logged at s - 1, as Lightning counts logging steps from 0.
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [1, 3, 5, 7, 9]


def test_checkpoint_write_interrupted_midway_keeps_the_old_file(tmp_path, monkeypatch):
    from lightning_diff.checkpoints import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(4.0)}, path)
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "no temporary file left behind"
    io.save_checkpoint({"w": torch.ones(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


class Foreign:
    """Not a tensor or plain container: refused by the weights-only loader."""


@pytest.mark.parametrize("kind", ["truncated", "foreign_pickle"])
def test_resume_refuses_a_corrupt_or_foreign_last_checkpoint_in_one_line(tmp_path, kind):
    from lightning_diff.errors import CheckpointError

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "lightning_diff": {}}, last)
        last.write_bytes(last.read_bytes()[:600])
    else:
        torch.save({"state_dict": {}, "lightning_diff": Foreign()}, last)
    with pytest.raises(CheckpointError) as info:
        train(compose_train(["data=moons", "resume=auto"], run_dir))
    message = str(info.value)
    assert "\n" not in message and str(last) in message
    assert ("corrupt" in message) if kind == "truncated" else ("not a lightning_diff checkpoint" in message)
    assert not (run_dir / "config.yaml").exists(), "refused before anything was trained or written"


def test_run_dir_default_comes_from_the_environment_while_training(tmp_path, monkeypatch):
    """ld-train exports the run directory during fit; a process relaunched by strategy=ddp composes
    the config again and, without run_dir on its command line, takes it from there."""
    import os

    import lightning as L

    from lightning_diff.train import RUN_DIR_ENV

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    first, second = compose_train([]).run_dir, None
    assert first.startswith("runs/run/")
    seen = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["env"] = os.environ.get(RUN_DIR_ENV)
            seen["child_run_dir"] = compose_train([]).run_dir  # what a relaunched rank composes

    cfg = compose_train(["data=moons", "trainer.max_steps=1", "logger=none"], tmp_path / "run")
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.callbacks.spy = {"_target_": f"{__name__}.Spy"}
    globals()["Spy"] = Spy
    train(cfg)
    assert seen == {"env": str(tmp_path / "run"), "child_run_dir": str(tmp_path / "run")}
    assert RUN_DIR_ENV not in os.environ, "restored after training"
    second = compose_train([]).run_dir
    assert second.startswith("runs/run/")


def test_resume_auto_takes_the_newest_of_last_and_slurm_requeue_checkpoints(tmp_path):
    from lightning_diff.checkpoints import find_last

    assert find_last(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"a")
    assert find_last(tmp_path) == last
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # written by Lightning on SLURM's requeue signal
    hpc.write_bytes(b"b")
    os.utime(last, ns=(1_000_000_000, 1_000_000_000))
    assert find_last(tmp_path) == hpc
    os.utime(hpc, ns=(500_000_000, 500_000_000))
    assert find_last(tmp_path) == last
