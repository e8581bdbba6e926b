"""Cluster set-ups: trainer=ddp (GPUs) and trainer=ddp_cpu (gloo processes) compose over the default
trainer; the SLURM template starts ld-train with overrides that compose."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import compose_train
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy

from lightning_diff.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"


def test_ddp_config_inherits_the_default_trainer():
    default = compose_train(["trainer=default"], tiny=False).trainer
    ddp = compose_train(["trainer=ddp"], tiny=False).trainer
    assert (ddp.accelerator, ddp.devices, ddp.strategy, ddp.num_nodes) == ("gpu", "auto", "ddp", 1)
    assert ddp.sync_batchnorm is False
    for key in ("_target_", "max_steps", "gradient_clip_val", "val_check_interval", "default_root_dir"):
        assert ddp[key] == default[key], key
    scaled = compose_train(["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"], tiny=False).trainer
    assert (scaled.num_nodes, scaled.devices) == (2, 4)


def test_ddp_cpu_trainer_instantiates_two_spawned_gloo_processes(tmp_path):
    cfg = compose_train(["trainer=ddp_cpu"], run_dir=tmp_path)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("cpu", 2, "ddp_spawn")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._start_method == "spawn"
    assert trainer.num_devices == 2 and trainer.num_nodes == 1
    assert trainer.max_steps == 6  # the tiny override still applies on top of the group


def test_slurm_template_requeues_and_runs_ld_train_with_composable_overrides():
    text = SBATCH.read_text()
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "--signal=SIGUSR1@90" in directives and "--requeue" in directives
    command = " ".join(line.strip().rstrip("\\") for line in text.split("\nsrun ", 1)[1].splitlines()[:8])
    words = shlex.split(command)
    assert words[0] == "ld-train" and words[-1] == "$@"
    overrides = [
        w.replace("${SLURM_NNODES}", "2").replace("${SLURM_NTASKS_PER_NODE}", "4").replace("${RUN_DIR}", "r")
        for w in words[1:-1]
    ]
    assert "resume=auto" in overrides
    cfg = compose_train(overrides, tiny=False)
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices) == ("ddp", 2, 4)
    assert cfg.run_dir == "r" and cfg.resume == "auto"


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_multirun_refuses_multiprocess_training(trainer):
    from lightning_diff.cli.train import refuse_multiprocess_multirun

    with pytest.raises(ConfigError, match="multirun"):
        refuse_multiprocess_multirun(compose_train([f"trainer={trainer}"]))
    refuse_multiprocess_multirun(compose_train(["trainer=cpu"]))  # one process: allowed
