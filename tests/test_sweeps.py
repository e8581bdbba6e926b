"""Every wandb sweep file composes: each combination of its parameters is a valid Hydra override set."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from conftest import compose_named

SWEEPS = sorted((Path(__file__).resolve().parent.parent / "sweeps").glob("*.yaml"))
PROGRAMS = {
    "lightning_diff.evaluate": "eval",
    "lightning_diff.train": "train",
    "lightning_diff.sample": "sample",
}


def combinations(parameters: dict) -> list[list[str]]:
    keys, choices = [], []
    for key, spec in parameters.items():
        keys.append(key)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)] for combo in itertools.product(*choices)]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_composes(path):
    sweep = yaml.safe_load(path.read_text())
    command = sweep["command"]
    assert command[-1] == "${args_no_hyphens}", (
        "Hydra wants key=value: end the command with ${args_no_hyphens}"
    )
    config_name = PROGRAMS[command[command.index("-m") + 1]]
    combos = combinations(sweep["parameters"])
    assert combos
    for overrides in combos:
        cfg = compose_named(config_name, overrides)
        for item in overrides:
            key, value = item.split("=", 1)
            if "." in key or key not in ("sampler", "data", "model", "net", "logger", "trainer", "callbacks"):
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert str(node) == value, f"{path.name}: {key} did not reach the config"
