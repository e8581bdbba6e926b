"""hydra/launcher=slurm and hydra/launcher=slurm_local (conf/hydra/launcher/): one single-GPU job per
sweep point through hydra-submitit-launcher. The Slurm one is followed as far as the batch script
it would submit; the local one runs a real two-job sweep of ld-train."""

from __future__ import annotations

import csv
import os
import pickle
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from conftest import TINY, TINY_NET
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_diff.checkpoints import read_checkpoint
from lightning_diff.cli import CONF_DIR, missing_launcher_plugin

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
PLUGIN = "hydra_plugins.hydra_submitit_launcher"
needs_plugin = pytest.mark.skipif(
    find_spec(PLUGIN) is None, reason="needs pip install 'lightning_diff[slurm]'"
)


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def directives(script: str) -> dict[str, str]:
    """``#SBATCH --key=value`` lines of a batch script, as {key: value}."""
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, flags=re.M))


@needs_plugin
def test_slurm_launcher_submits_single_gpu_jobs_sized_like_the_sbatch_template(tmp_path, monkeypatch):
    import submitit

    sweep_dir = tmp_path / "sweep"
    cfg = compose_with_hydra(["hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}"])
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert OmegaConf.get_type(launcher_cfg).__name__ == "SlurmQueueConf"  # typed by the plugin's schema
    assert launcher_cfg.partition is None and launcher_cfg.max_num_timeout == 0
    for bad in ("hydra.launcher.gpus_per_node=one", "hydra.launcher.gpu=1"):
        with pytest.raises(ConfigCompositionException):
            compose_with_hydra(["hydra/launcher=slurm", bad])

    # Follow the plugin's own launch up to the submission: a stand-in srun lets submitit build its
    # Slurm executor, and map_array (which would call sbatch) hands the executor over instead.
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    executors = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda ex, fn, *args: executors.append(ex) or [])
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0) == []
    assert sweep_dir.is_dir()
    slurm = executors[0]._executor
    asked = directives(slurm._make_submission_file_text("ld-train", "uid"))
    assert (asked["gpus-per-node"], asked["ntasks-per-node"], asked["nodes"]) == ("1", "1", "1")
    assert asked["mem"] == "32GB" and "partition" not in asked
    assert asked["output"].startswith(f"{sweep_dir}/.submitit/%j/")
    assert slurm.parameters["array_parallelism"] == 16

    template = directives(SBATCH.read_text())
    assert asked["cpus-per-task"] == template["cpus-per-task"]
    hours, minutes, _ = (int(x) for x in template["time"].split(":"))  # --time=HH:MM:SS
    assert int(asked["time"]) == 60 * hours + minutes


@needs_plugin
def test_local_launcher_runs_the_same_jobs_with_the_local_executor():
    slurm = compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher
    local = compose_with_hydra(["hydra/launcher=slurm_local"]).hydra.launcher
    assert local._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    for key in ("gpus_per_node", "tasks_per_node", "nodes", "timeout_min", "submitit_folder"):
        assert local._get_node(key)._value() == slurm._get_node(key)._value(), key


@needs_plugin
def test_multirun_with_the_local_executor_writes_each_job_to_its_sweep_subdir(tmp_path):
    """Two jobs (seeds 0, 1), each its own submitit process, in runs/<name>/<date_time>/<job number>."""
    overrides = [o for o in TINY_NET + TINY if not o.startswith(("callbacks.", "trainer.val_check"))] + [
        "data=moons",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid=null",
        "callbacks.evaluation=null",
        f"paths.runs={tmp_path / 'runs'}",
    ]
    command = [
        sys.executable,
        "-m",
        "lightning_diff.cli.train",
        "-m",
        "hydra/launcher=slurm_local",
        "seed=0,1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    result = subprocess.run(
        [*command, "seed=0,1", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    (sweep_dir,) = (tmp_path / "runs" / "run").iterdir()  # one sweep: runs/<name>/<date_time>
    outcomes = [pickle.loads(p.read_bytes())[0] for p in sweep_dir.glob(".submitit/*/*_result.pkl")]
    assert outcomes == ["success", "success"]
    for job, seed in ((0, 0), (1, 1)):
        run_dir = sweep_dir / str(job)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["seed"] == seed and saved["run_dir"] == str(run_dir)
        assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
        with (run_dir / "csv" / "metrics.csv").open() as f:
            losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
        assert len(losses) == 2


def test_a_missing_plugin_is_reported_in_one_line(monkeypatch, capsys):
    from lightning_diff.cli.train import main

    assert missing_launcher_plugin(["-m", "hydra/launcher=basic", "seed=0,1"]) is None
    try:
        import hydra_plugins
    except ModuleNotFoundError:
        pass  # no Hydra plugin installed at all
    else:  # as without hydra-submitit-launcher: Hydra's plugin namespace holds nothing
        monkeypatch.setattr(hydra_plugins, "__path__", [])
        monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    monkeypatch.setattr(sys, "argv", ["ld-train", "-m", "hydra/launcher=slurm", "seed=0,1"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: hydra/launcher=slurm needs pip install 'lightning_diff[slurm]'"
    ]
