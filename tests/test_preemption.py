"""SIGTERM / SIGUSR1 during training: a checkpoint of the current step, a clean exit, then resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY, TINY_NET, compose_train

from lightning_diff.checkpoints import read_checkpoint
from lightning_diff.cli.train import train

RUN = [
    "data=moons",
    "data.num_samples=400",
    "trainer.max_steps=1000000",
    "trainer.val_check_interval=50",
    "callbacks.checkpoint.every_n_train_steps=20",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.evaluation.num_samples=8",
]


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_the_current_step_and_resume_continues(tmp_path, signame):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.pop("LD_RUN_DIR", None)
    cmd = [sys.executable, "-m", "lightning_diff.cli.train", *TINY_NET, *TINY, *RUN, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (ckpts / "step0000020.ckpt").is_file():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no periodic checkpoint within 120 s"
            time.sleep(0.1)
        time.sleep(1.0)  # some steps past the periodic checkpoint
        proc.send_signal(getattr(signal, signame))
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + getattr(signal, signame), output[-3000:]
    last = read_checkpoint(ckpts / "last.ckpt")
    periodic = max(int(p.stem[4:]) for p in ckpts.glob("step*.ckpt"))
    assert last["global_step"] > 20 and last["global_step"] >= periodic
    message = [line for line in output.splitlines() if f"stopped by {signame} at step" in line]
    assert len(message) == 1, output[-3000:]
    assert f"step {last['global_step']}" in message[0] and "resume=auto" in message[0]
    assert str(ckpts / "last.ckpt") in message[0]
    # and the run's closing summary says so, with the checkpoint to resume from
    summary = output[output.index(f"ld-train stopped by {signame}") :]
    assert f"step {last['global_step']}" in summary.splitlines()[0]
    assert f"checkpoint  {ckpts / 'last.ckpt'}" in summary
    assert not list(ckpts.glob(".tmp-*")), "no temporary checkpoint files left"

    more = last["global_step"] + 2
    _, objects = train(
        compose_train(RUN + [f"trainer.max_steps={more}", "resume=auto", "logger=csv"], run_dir)
    )
    assert objects["trainer"].global_step == more and objects["stopped_by"] is None


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_in_process_stops_after_the_step_with_a_checkpoint_of_it(tmp_path, signame):
    """The same in one process: the signal arrives during step 7 (periodic checkpoints every 5)."""
    import lightning as L
    from omegaconf import open_dict

    class SignalAtStep7(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 6:  # the 7th step is running
                os.kill(os.getpid(), getattr(signal, signame))

    globals()["SignalAtStep7"] = SignalAtStep7
    cfg = compose_train(RUN + ["callbacks.checkpoint.every_n_train_steps=5"], tmp_path / "run")
    with open_dict(cfg):
        cfg.callbacks.signal = {"_target_": f"{__name__}.SignalAtStep7"}
    before = signal.getsignal(getattr(signal, signame))
    _, objects = train(cfg)
    assert objects["stopped_by"] == signame and objects["trainer"].global_step == 7
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert signal.getsignal(getattr(signal, signame)) == before, "handlers are put back"


def test_sigterm_between_steps_saves_the_last_finished_step(tmp_path):
    """SIGTERM after a step's end hooks: Lightning stops before the next step; step 7 is still saved."""
    import lightning as L
    from omegaconf import open_dict

    class SigtermAfterStep7(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 7:  # after the preemption callback has looked at step 7
                os.kill(os.getpid(), signal.SIGTERM)

    globals()["SigtermAfterStep7"] = SigtermAfterStep7
    cfg = compose_train(RUN + ["callbacks.checkpoint.every_n_train_steps=5"], tmp_path / "run")
    with open_dict(cfg):
        cfg.callbacks.signal = {"_target_": f"{__name__}.SigtermAfterStep7"}
    _, objects = train(cfg)
    assert objects["stopped_by"] == "SIGTERM" and objects["trainer"].global_step == 7
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 7
