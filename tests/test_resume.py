"""Exact resume: stopping at step k and resuming to n ends where an uninterrupted run to n ends."""

from __future__ import annotations

import csv
import os
import signal

import lightning as L
import pytest
import torch
from conftest import compose_train
from omegaconf import open_dict

from lightning_diff.checkpoints import read_checkpoint
from lightning_diff.cli.train import train

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


# The shipped defaults (sizes and steps aside): periodic checkpoints every 1000 steps, so the last
# checkpoint of a short run is the one written when fit ends. 2 steps per epoch, as above.
DEFAULTS = [
    "data=moons",
    "data.num_samples=100",
    "data.batch_size=32",
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=1000",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.evaluation.num_samples=8",
]
STRAIGHT_STEPS = 12


class SignalAt(L.Callback):
    """Sends ``signame`` to this process during step ``step`` (``when=during``) or after that step's
    end hooks (``when=after``, the preemption callback has already looked at the step by then)."""

    def __init__(self, step: int, signame: str = "SIGTERM", when: str = "during"):
        self.step, self.signum, self.when = step, getattr(signal, signame), when

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.when == "during" and trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.when == "after" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _with_callback(cfg, name: str, target: type, **kwargs):
    with open_dict(cfg):
        cfg.callbacks[name] = {"_target_": f"{__name__}.{target.__name__}", **kwargs}
    return cfg


def _assert_same_rng_states(a: dict, b: dict) -> None:
    assert len(a["rng_states"]) == len(b["rng_states"])
    for sa, sb in zip(a["rng_states"], b["rng_states"], strict=True):
        assert torch.equal(sa["torch"], sb["torch"])
        assert sa["numpy"][0] == sb["numpy"][0] and torch.equal(sa["numpy"][1], sb["numpy"][1])
        assert sa["numpy"][2:] == sb["numpy"][2:] and sa["python"] == sb["python"]


def _assert_same_run(straight_dir, resumed_dir, steps: int = STRAIGHT_STEPS) -> None:
    """Raw and EMA weights, optimiser and scheduler state, data position, RNG states and every
    logged train/loss of the two runs are identical."""
    a = read_checkpoint(straight_dir / "checkpoints" / "last.ckpt")
    b = read_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == steps
    _assert_same_state(a, b)
    assert any(k.startswith("ema.") for k in a["state_dict"])
    assert a["epoch"] == b["epoch"]
    assert a["SyntheticDataModule"] == b["SyntheticDataModule"]
    _assert_same_rng_states(a, b)
    losses_a, losses_b = _train_losses(straight_dir), _train_losses(resumed_dir)
    assert sorted(losses_a) == sorted(losses_b) == list(range(steps))
    assert [losses_a[s] for s in range(steps)] == [losses_b[s] for s in range(steps)]


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted runs of ``STRAIGHT_STEPS`` steps, one per base config, made on first use."""
    runs = {}

    def get(base: tuple[str, ...]):
        if base not in runs:
            run_dir = tmp_path_factory.mktemp("straight") / "run"
            train(compose_train([*base, f"trainer.max_steps={STRAIGHT_STEPS}"], run_dir))
            runs[base] = run_dir
        return runs[base]

    return get


# How the first run stops: overrides of both runs, of the first run only, the signal it receives,
# and the checkpoint the second run resumes from (with its step).
STOPS = {
    "max_steps_mid_epoch": ([], ["trainer.max_steps=5"], None, ("last.ckpt", 5)),
    "max_steps_epoch_end": ([], ["trainer.max_steps=6"], None, ("last.ckpt", 6)),  # a validation step too
    # A run killed at step 7, after its periodic checkpoint of step 5 (mid-epoch).
    "periodic_mid_epoch": (
        ["callbacks.checkpoint.every_n_train_steps=5"],
        ["trainer.max_steps=7"],
        None,
        ("step0000005.ckpt", 5),
    ),
    "sigterm_during_a_step": ([], ["trainer.max_steps=100"], {"step": 7, "when": "during"}, ("last.ckpt", 7)),
    "sigterm_after_an_epoch_end": (
        [],
        ["trainer.max_steps=100"],
        {"step": 6, "when": "after"},
        ("last.ckpt", 6),
    ),
}
BASES = {
    "default": (),
    "dropout": ("net.mlp.dropout=0.1",),
    "score_sde": ("model=score_sde",),
    "kernel_wpo": ("model=kernel_wpo",),
}
CASES = [
    *[("default", stop) for stop in STOPS],
    ("dropout", "max_steps_mid_epoch"),
    ("score_sde", "sigterm_during_a_step"),
    ("kernel_wpo", "periodic_mid_epoch"),
]


@pytest.mark.parametrize(("base", "stop"), CASES, ids=[f"{b}-{s}" for b, s in CASES])
def test_stopped_run_extended_ends_like_a_straight_run(tmp_path, straight_runs, base, stop):
    """Stop a run (by max_steps, after a periodic checkpoint, by SIGTERM), then run the same command
    with more steps and resume=auto (or the periodic file): it ends bit-identical to an
    uninterrupted run."""
    both, first_only, signal_at, (name, saved_step) = STOPS[stop]
    overrides = [*DEFAULTS, *BASES[base], *both]
    run_dir = tmp_path / "run"
    cfg = compose_train(overrides + first_only, run_dir)
    if signal_at is not None:
        cfg = _with_callback(cfg, "signal", SignalAt, **signal_at)
    _, first = train(cfg)
    assert first["stopped_by"] == ("SIGTERM" if signal_at else None)
    # last.ckpt holds the step the run ended at, also when periodic checkpoints were written before.
    assert (
        read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == first["trainer"].global_step
    )
    ckpt = run_dir / "checkpoints" / name
    assert read_checkpoint(ckpt)["global_step"] == saved_step
    resume = "resume=auto" if name == "last.ckpt" else f"resume={ckpt}"
    _, second = train(compose_train(overrides + [f"trainer.max_steps={STRAIGHT_STEPS}", resume], run_dir))
    assert second["trainer"].global_step == STRAIGHT_STEPS
    _assert_same_run(straight_runs(tuple(overrides)), run_dir)


def test_slurm_requeue_checkpoint_resumes_exactly(tmp_path, monkeypatch, straight_runs):
    """Under SLURM with auto-requeue, SIGUSR1 during step 7: Lightning's requeue (its hpc_ckpt_1.ckpt
    and ``scontrol requeue``) runs at the end of that step, training goes on, and resuming from the
    requeue checkpoint ends bit-identical to a straight run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$0.calls"\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "ld-train", "SLURM_JOB_ID": "4242"}
    for key, value in {**slurm, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    run_dir = tmp_path / "run"
    cfg = compose_train([*DEFAULTS, "trainer.max_steps=9"], run_dir)
    _, first = train(_with_callback(cfg, "signal", SignalAt, step=7, signame="SIGUSR1"))
    assert first["trainer"].global_step == 9 and first["stopped_by"] is None, "requeued, not stopped"
    preemption = next(c for c in first["trainer"].callbacks if type(c).__name__ == "PreemptionCheckpoint")
    assert preemption.requeued
    assert (bin_dir / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert read_checkpoint(hpc)["global_step"] == 7
    assert read_checkpoint(hpc)["SyntheticDataModule"] == {"epoch": 3, "batches": 1}
    _, second = train(
        compose_train([*DEFAULTS, f"trainer.max_steps={STRAIGHT_STEPS}", f"resume={hpc}"], run_dir)
    )
    assert second["trainer"].global_step == STRAIGHT_STEPS
    _assert_same_run(straight_runs(tuple(DEFAULTS)), run_dir)


class ScriptedValidation(L.Callback):
    """A validation metric the test controls: lowest at step 3, lower still at step 9, high otherwise
    (set at validation epoch end, before BestWeights reads it at validation end)."""

    def on_validation_epoch_end(self, trainer, pl_module):
        value = {3: 1.0, 9: 0.5}.get(trainer.global_step, 10.0)
        trainer.callback_metrics["val/scripted"] = torch.tensor(value)


def test_a_run_that_ended_on_its_best_weights_extends_like_a_straight_run(tmp_path, straight_runs):
    """``callbacks=with_best_weights`` ends a run on its best validation's weights, and its last.ckpt
    holds them. Extending that run (resume=auto) continues from the weights training had reached,
    not from the best ones: it ends identical to a straight run, whose best (step 9) comes after
    the first run's end (step 5, best at step 3)."""
    overrides = [
        *DEFAULTS,
        "callbacks=with_best_weights",
        "callbacks.best_weights.monitor=val/scripted",
        "trainer.val_check_interval=1",
    ]

    def run(extra, run_dir):
        return train(_with_callback(compose_train(overrides + extra, run_dir), "s", ScriptedValidation))

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run([f"trainer.max_steps={STRAIGHT_STEPS}"], straight)
    _, first = run(["trainer.max_steps=5"], resumed)
    ended = read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    best = next(c for c in first["trainer"].callbacks if type(c).__name__ == "BestWeights")
    assert ended["global_step"] == 5 and best.best_step == 3
    for key, value in best.weights.items():  # what ld-sample reads: the best weights
        assert torch.equal(ended["state_dict"][key], value), key
    run([f"trainer.max_steps={STRAIGHT_STEPS}", "resume=auto"], resumed)
    _assert_same_run(straight, resumed)


TWO_PROCESSES = ("trainer=ddp_cpu",)  # two gloo processes (ddp_spawn)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_run_stopped_and_extended_ends_like_a_straight_two_process_run(tmp_path, straight_runs):
    run_dir = tmp_path / "run"
    overrides = [*DEFAULTS, *TWO_PROCESSES]
    train(compose_train(overrides + ["trainer.max_steps=5"], run_dir))
    assert len(read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["rng_states"]) == 2
    train(compose_train(overrides + [f"trainer.max_steps={STRAIGHT_STEPS}", "resume=auto"], run_dir))
    _assert_same_run(straight_runs(tuple(overrides)), run_dir)


@pytest.mark.slow
@pytest.mark.ddp
def test_ld_train_under_strategy_ddp_stopped_and_resumed_ends_like_a_straight_spawned_run(
    tmp_path, straight_runs
):
    """``trainer=ddp``, the cluster config, starts its other ranks with Lightning's subprocess
    launcher: rank 1 is the ``ld-train`` command run again by Lightning (with Hydra overrides of its
    own), not a fork of rank 0. Both halves of a stopped-and-resumed run go through the command line
    that way, on two gloo processes, and end identical to a straight ``ddp_spawn`` run."""
    import subprocess
    import sys

    from conftest import TINY, TINY_NET

    run_dir = tmp_path / "run"
    base = [*TINY_NET, *TINY, *DEFAULTS, *TWO_PROCESSES, "trainer.strategy=ddp", f"run_dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    for extra in (["trainer.max_steps=5"], [f"trainer.max_steps={STRAIGHT_STEPS}", "resume=auto"]):
        done = subprocess.run(
            [sys.executable, "-m", "lightning_diff.cli.train", *base, *extra],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "MEMBER: 2/2" in done.stderr, "two processes, the second started by the launcher"
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == STRAIGHT_STEPS
    _assert_same_run(straight_runs((*DEFAULTS, *TWO_PROCESSES)), run_dir)
    # The relaunched rank wrote its log beside rank 0's and no Hydra output directory of its own.
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "run"]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("counts", [(2, 1), (1, 2)], ids=["2_to_1", "1_to_2"])
def test_requeue_on_another_process_count_ends_where_a_run_on_the_new_count_would(
    tmp_path, straight_runs, counts
):
    """A run stopped mid-epoch (by the preemption callback at step 7) on one process count and
    resumed on another continues the same global batches and noise: it ends where a straight run
    on the new count ends, within the tolerance of tests/test_ddp_equivalence.py. SIGUSR1 rather
    than SIGTERM: under ddp_spawn, Lightning 2.6 ends the spawned processes on SIGTERM without
    handing a result back, and the launching process waits for it forever."""
    import numpy as np
    from test_ddp_equivalence import LOSS_TOLERANCE, WEIGHT_TOLERANCE

    before, after = ([*TWO_PROCESSES] if n == 2 else [] for n in counts)
    run_dir = tmp_path / "run"
    cfg = compose_train([*DEFAULTS, *before, "trainer.max_steps=100"], run_dir)
    train(_with_callback(cfg, "signal", SignalAt, step=7, signame="SIGUSR1"))
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 7 and len(saved["rng_states"]) == counts[0]
    assert saved["SyntheticDataModule"] == {"epoch": 3, "batches": 1}
    resumed = [*DEFAULTS, *after, f"trainer.max_steps={STRAIGHT_STEPS}", "resume=auto"]
    train(compose_train(resumed, run_dir))
    straight = straight_runs(tuple([*DEFAULTS, *after]))
    a = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STRAIGHT_STEPS
    assert a["SyntheticDataModule"] == b["SyntheticDataModule"] and len(b["rng_states"]) == counts[1]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, **WEIGHT_TOLERANCE, msg=key)
    losses_a, losses_b = _train_losses(straight), _train_losses(run_dir)
    assert sorted(losses_a) == sorted(losses_b) == list(range(STRAIGHT_STEPS))
    steps = range(STRAIGHT_STEPS)
    np.testing.assert_allclose([losses_b[s] for s in steps], [losses_a[s] for s in steps], **LOSS_TOLERANCE)


def test_each_rank_continues_the_rng_states_of_a_saved_rank_on_any_process_count():
    from lightning_diff.resume import rank_rng_state

    saved = [{"rank": 0}, {"rank": 1}]
    assert [rank_rng_state(saved, r, 2)["rank"] for r in range(2)] == [0, 1]
    assert rank_rng_state(saved, 0, 1)["rank"] == 0  # 2 -> 1
    assert [rank_rng_state(saved[:1], r, 2)["rank"] for r in range(2)] == [0, 0]  # 1 -> 2
    assert [rank_rng_state(saved, r, 4)["rank"] for r in range(4)] == [0, 1, 0, 1]


class SaveAtLastStepEnd(L.Callback):
    """Writes ``batch_end.ckpt`` at the end of the step that reaches max_steps (as periodic and
    preemption checkpoints are written)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == trainer.max_steps:
            trainer.save_checkpoint(os.path.join(trainer.default_root_dir, "batch_end.ckpt"))


@pytest.mark.parametrize("steps", [5, 6], ids=["mid_epoch", "epoch_end_after_validation"])
def test_end_of_fit_loop_state_is_aligned_to_the_state_at_the_end_of_its_last_step(tmp_path, steps):
    """The one place Lightning's checkpoint layout is read (resume.align_loop_state): the loop state
    saved when fit ends, aligned, equals the one Lightning saves at the end of the same step (a
    Lightning version that lays out or counts its loops differently fails here)."""
    from lightning_diff.lightning_internals import fit_loop_counters
    from lightning_diff.resume import align_loop_state

    cfg = _with_callback(
        compose_train([*DEFAULTS, f"trainer.max_steps={steps}"], tmp_path), "s", SaveAtLastStepEnd
    )
    train(cfg)
    at_step_end = read_checkpoint(tmp_path / "batch_end.ckpt")
    at_fit_end = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert at_step_end["global_step"] == at_fit_end["global_step"] == steps
    assert fit_loop_counters(at_fit_end) is not None
    epochs = at_fit_end["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert epochs["completed"] == at_fit_end["epoch"] == 3, "fit's end counts the running epoch as done"
    fit_loop = at_step_end["loops"]["fit_loop"]
    if steps == 6:  # validation ran after the step's end hooks: the one other difference
        fit_loop["epoch_loop.val_loop.batch_progress"] = at_fit_end["loops"]["fit_loop"][
            "epoch_loop.val_loop.batch_progress"
        ]
    assert at_step_end["loops"] != at_fit_end["loops"]
    assert align_loop_state(at_fit_end) is True
    assert at_fit_end["loops"] == at_step_end["loops"]
    assert align_loop_state(at_step_end) is False, "a checkpoint of a step's end is left as it is"
    assert align_loop_state({"loops": {"fit_loop": {}}}) is False


def test_resume_after_a_kill_supersedes_csv_rows_logged_after_the_checkpoint(tmp_path):
    """A run killed at step 8 whose last checkpoint is at step 4 (emulated by putting the step-4 file
    back as last.ckpt): resuming keeps the rows before step 4 and logs steps 4.. once each."""
    run_dir = tmp_path / "run"
    base = EXACT + ["callbacks.checkpoint.every_n_train_steps=4", "trainer.val_check_interval=2"]
    train(compose_train(base + ["trainer.max_steps=8"], run_dir))
    ckpts = run_dir / "checkpoints"
    (ckpts / "last.ckpt").write_bytes((ckpts / "step0000004.ckpt").read_bytes())
    assert max(int(r["step"]) for r in _csv_rows(run_dir)) == 8
    kept = [r for r in _csv_rows(run_dir) if int(r["step"]) < 4]
    _, resumed = train(compose_train(base + ["trainer.max_steps=10", "resume=auto"], run_dir))
    assert resumed["trainer"].global_step == 10
    assert sorted(_train_losses(run_dir)) == list(range(10))
    rows = _csv_rows(run_dir)
    for key in ("train/loss", "val/loss", "train/lr"):
        steps = [int(r["step"]) for r in rows if r.get(key)]
        assert steps == sorted(set(steps)), (key, steps)
    # Validation after step s is logged at s - 1, as Lightning counts logging steps from 0.
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [1, 3, 5, 7, 9]
    assert [r for r in rows if int(r["step"]) < 4] == kept, "the rows before the checkpoint, as written"


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

    from lightning_diff.cli.train import RUN_DIR_ENV

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
