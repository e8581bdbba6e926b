"""Every wandb sweep file in sweeps/ composes: each combination of its parameters is a valid Hydra
override set of the program it runs, and its command hands the overrides over as ``key=value``."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, TINY_NET, compose_named
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lightning_diff.cli import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
PROGRAMS = {
    "lightning_diff.cli.evaluate": "eval",
    "lightning_diff.cli.train": "train",
    "lightning_diff.cli.sample": "sample",
}


def combinations(parameters: dict) -> list[list[str]]:
    keys, choices = [], []
    for key, spec in parameters.items():
        keys.append(key)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*choices)]


def missing_group_option(overrides: list[str]) -> str | None:
    """``group=option`` among ``overrides`` whose ``conf/group/option.yaml`` does not exist, if any."""
    for item in overrides:
        key, value = item.split("=", 1)
        if (Path(CONF_DIR) / key).is_dir() and not (Path(CONF_DIR) / key / f"{value}.yaml").is_file():
            return f"{key}={value} (conf/{key}/{value}.yaml)"
    return None


def test_every_sweep_file_is_found():
    assert {"teleport_skip", "memorization", "sampler_steps", "lr_batch"} <= {p.stem for p in SWEEPS}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_composes(path):
    sweep = yaml.safe_load(path.read_text())
    assert {"program", "method", "metric", "parameters", "command"} <= set(sweep), path.name
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "-m"], "run the program as python -m MODULE"
    assert command[-1] == "${args_no_hyphens}", (
        "Hydra wants key=value: end the command with ${args_no_hyphens}"
    )
    module = command[3]
    assert module in PROGRAMS, f"{path.name}: unknown module {module}"
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    assert (ROOT / sweep["program"]).is_file(), f"{path.name}: program {sweep['program']} does not exist"
    config_name = PROGRAMS[module]
    combos = combinations(sweep["parameters"])
    assert combos
    parser = OverridesParser.create()
    missing = set()
    for overrides in combos:
        absent = missing_group_option(overrides)
        if absent:
            missing.add(absent)
            continue
        cfg = compose_named(config_name, overrides)
        for item in overrides:
            key = item.split("=", 1)[0]
            if (Path(CONF_DIR) / key).is_dir():  # a config group choice: checked by composing
                continue
            node = cfg
            for part in key.split("."):
                node = node[part]
            expected = parser.parse_override(item).value()
            assert node == expected, f"{path.name}: {item} did not reach the config ({node!r})"
    # A sweep that names an option conf/ lacks would fail on its first run: fail here instead.
    assert not missing, f"{path.name}: these options are not in conf/: {', '.join(sorted(missing))}"


def test_multirun_default_directories():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False) == {
        "dir": "${paths.runs}/${name}/${now:%Y-%m-%d_%H-%M-%S}",
        "subdir": "${hydra.job.num}",
    }
    default = "${paths.runs}/${name}/${now:%Y-%m-%d_%H-%M-%S}"
    assert cfg._get_node("run_dir")._value() == "${oc.env:LD_RUN_DIR," + default + "}"


def test_missing_group_option_is_detected():
    assert missing_group_option(["model=ddpm", "data.num_train=32"]) is None
    absent = missing_group_option(["model=no_such_family"])
    assert absent == "model=no_such_family (conf/model/no_such_family.yaml)"


@pytest.mark.slow
def test_hydra_multirun_gives_each_job_its_own_run_directory(tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in TINY_NET + TINY if not o.startswith(("callbacks.evaluation", "logger"))] + [
        "data=moons",
        "logger=wandb",
        "logger.wandb.mode=offline",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.evaluation.num_samples=16",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "lightning_diff.cli.train", "-m", "seed=1,2", *overrides]
    result = subprocess.run(
        [*command, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    wandb_ids = set()
    for job, seed in ((0, 1), (1, 2)):
        run_dir = sweep_dir / str(job)
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["run_dir"] == str(run_dir) and saved["seed"] == seed
        # each job has its own wandb run, written under its own run directory
        run_id = (run_dir / "wandb_id.txt").read_text().strip()
        assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
        wandb_ids.add(run_id)
    assert len(wandb_ids) == 2
    assert not (tmp_path / "runs").exists()  # nothing went to the single-run default
