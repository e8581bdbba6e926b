"""Shared test helpers: config composition, tiny overrides that keep training runs to seconds."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from lightning_diff.cli import CONF_DIR

# Tests marked gpu skip without CUDA, except where a GPU is promised: bench/gpu.sh sets
# LD_REQUIRE_GPU=1, and there a device that is missing fails them instead of skipping them.
needs_gpu = pytest.mark.skipif(
    os.environ.get("LD_REQUIRE_GPU") != "1" and not __import__("torch").cuda.is_available(),
    reason="needs a CUDA GPU (LD_REQUIRE_GPU=1 makes a missing one a failure)",
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Small nets, few steps, few samples: a training run in a few seconds on 2 CPU cores.
TINY_NET = [  # for net=auto|mlp|unet; the kernel model's precision field is small already
    "net.mlp.hidden_dim=32",
    "net.mlp.num_layers=2",
    "net.unet.base_channels=16",
    "net.unet.channel_mult=[1,2]",
    "net.unet.num_res_blocks=1",
    "net.unet.attn_resolutions=[4]",
]
TINY = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "callbacks.checkpoint.every_n_train_steps=3",
    "callbacks.sample_grid.every_n_steps=3",
    "callbacks.sample_grid.num_samples=8",
    "callbacks.evaluation.num_samples=32",
    "sampler.num_steps=5",
    "model.lr_warmup_steps=2",
    "logger=csv",
]


def compose_train(overrides: list[str], run_dir=None, tiny: bool = True) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides`` (after the tiny defaults) as ``ld-train`` would."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=(TINY if tiny else []) + list(overrides))
        if tiny and "mlp" in cfg.net:
            cfg = compose("train", overrides=TINY_NET + TINY + list(overrides))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


def compose_named(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


@pytest.fixture
def tiny_train():
    """Run ``train`` on a composed tiny config; returns (metrics, objects)."""
    from lightning_diff.cli.train import train

    def run(overrides: list[str], run_dir) -> tuple[dict, dict]:
        return train(compose_train(overrides, run_dir))

    return run


def small_unet(in_channels: int = 1, resolution: int = 8, base_channels: int = 8):
    """A two-level UNet with attention at the lower level, no dropout, seeded weights."""
    import torch

    from lightning_diff.nets import UNet

    torch.manual_seed(0)
    return UNet(
        in_channels=in_channels,
        resolution=resolution,
        base_channels=base_channels,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(resolution // 2,),
        dropout=0.0,
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format MNIST ships in: magic 0x0008<ndim>, big-endian dims."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_torchvision_files(root: Path, dataset: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Tiny files in torchvision's layout under ``root``: ``images`` (N x H x W for the MNIST sets,
    N x 32 x 32 x 3 for CIFAR-10, uint8) as both splits. MNIST and Fashion-MNIST are IDX files in
    ``<Class>/raw``; CIFAR-10 is the pickled batches of ``cifar-10-batches-py`` (five training batches
    sharing the rows in order, a test batch, the meta file). torchvision checks CIFAR-10's files by
    MD5: the caller replaces ``torchvision.datasets.cifar.check_integrity`` with a file-exists test."""
    if dataset in ("mnist", "fashion_mnist"):
        raw = root / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[dataset] / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for split in ("train", "t10k"):
            write_idx(raw / f"{split}-images-idx3-ubyte", images)
            write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        return
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # torchvision stores C x H x W rows
    parts = np.array_split(np.arange(len(images)), 5)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for name, part in [*zip(names, parts, strict=True), ("test_batch", np.arange(len(images)))]:
        batch = {"data": rows[part], "labels": [int(v) for v in labels[part]]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


#: 300 steps on the 8-Gaussian mixture (radius 4): enough for a 2-D MLP to learn every mode.
LEARN_GMM = [
    "data=gmm",
    "data.batch_size=512",
    "net.mlp.hidden_dim=64",
    "model.optimizer.lr=3e-3",
    "model.lr_warmup_steps=20",
    "model.ema_decay=0.99",
    "trainer.max_steps=300",
    "trainer.val_check_interval=300",
    "callbacks.sample_grid.every_n_steps=0",
    "callbacks.checkpoint.every_n_train_steps=300",
    "callbacks.evaluation=null",
    "logger=none",
]


def gaussian_adversary_ratio(samples, data) -> float:
    """Sliced Wasserstein distance of ``samples`` to ``data`` over that of the data's own Gaussian
    (its mean and covariance, the same number of points): a model that learned no mode scores ~1."""
    import torch
    from torch.distributions import MultivariateNormal

    from lightning_diff.metrics.distances import sliced_wasserstein

    def distance(x):
        return sliced_wasserstein(x, data, generator=torch.Generator().manual_seed(3)).item()

    gaussian = MultivariateNormal(data.mean(0).double(), torch.cov(data.T.double()))
    torch.manual_seed(4)
    draws = gaussian.sample((len(samples),)).float()
    return distance(samples) / distance(draws)
