"""Every config file composes and instantiates; every experiment builds its model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import compose_named, compose_train, write_torchvision_files
from hydra.utils import instantiate
from PIL import Image

from lightning_diff.checkpoints import build_family_net
from lightning_diff.cli import CONF_DIR
from lightning_diff.data import DiffusionDataModule
from lightning_diff.diffusion import Sampler
from lightning_diff.models import DiffusionModule

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_exist():
    for group in (
        "data",
        "model",
        "net",
        "sampler",
        "logger",
        "trainer",
        "callbacks",
        "paths",
        "experiment",
        "debug",
    ):
        assert options(group), f"conf/{group} is empty"


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    np.save(root / "vectors.npy", np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32))
    folder = root / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    rng = np.random.default_rng(0)
    labels = np.arange(12, dtype=np.uint8) % 10
    for name, shape in [
        ("mnist", (12, 28, 28)),
        ("fashion_mnist", (12, 28, 28)),
        ("cifar10", (12, 32, 32, 3)),
    ]:
        write_torchvision_files(
            root / "torchvision", name, rng.integers(0, 256, shape, dtype=np.uint8), labels
        )
    torchvision = [f"data.root={root / 'torchvision'}", "data.num_workers=0", "data.batch_size=4"]
    return {
        "array": [f"data.path={root / 'vectors.npy'}"],
        "image_folder": [f"data.path={folder}", "data.resolution=8"],
        **{name: torchvision for name in ("mnist", "fashion_mnist", "cifar10")},
    }


@pytest.mark.parametrize("name", options("data"))
def test_every_data_config_instantiates(name, data_files, tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    # The fake CIFAR-10 files cannot match torchvision's MD5 sums: check that they exist instead.
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file()
    )
    cfg = compose_train([f"data={name}", f"paths.data={tmp_path}"] + data_files.get(name, []))
    dm = instantiate(cfg.data)
    assert isinstance(dm, DiffusionDataModule)
    dm.setup("fit")
    x = next(iter(dm.train_dataloader()))
    assert tuple(x.shape[1:]) == tuple(dm.data_shape)
    net = instantiate(cfg.net, data_shape=tuple(dm.data_shape))
    model = instantiate(cfg.model, net=net)
    model.fit_data(dm.train_tensor())  # as ld-train does before training
    assert model.loss(x).shape == (x.shape[0],)


@pytest.mark.parametrize("group", ["model", "net", "sampler", "logger", "trainer", "callbacks", "debug"])
def test_every_option_of_a_group_composes(group, tmp_path):
    for name in options(group):
        family = ["model=kernel_wpo"] if (group, name) == ("net", "precision_field") else []  # its own family
        cfg = compose_train([*family, f"{group}={name}", "data=moons", "logger=none", f"run_dir={tmp_path}"])
        if group == "sampler":
            assert isinstance(instantiate(cfg.sampler), Sampler)
        if group in ("model", "net"):
            net = build_family_net(cfg, (1, 8, 8) if name == "unet" else (2,))
            assert isinstance(instantiate(cfg.model, net=net), DiffusionModule)
        if group == "trainer":
            trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
            assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_builds_its_model(name, tmp_path):
    cfg = compose_train([f"experiment={name}", f"run_dir={tmp_path}"], tiny=False)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model = instantiate(cfg.model, net=build_family_net(cfg, tuple(dm.data_shape)))
    assert isinstance(model, DiffusionModule) and cfg.name == name


def test_sample_and_eval_configs_compose():
    assert compose_named("sample", ["ckpt=x.ckpt", "sampler=ancestral"]).sampler.num_steps == 1000
    assert compose_named("eval", ["samples=x.npy", "data=digits"]).data._target_.endswith("DigitsDataModule")
