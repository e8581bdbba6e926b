"""``ld-sample ckpt=PATH num_samples=N out=FILE.npy``: draw samples from a trained model.

Writes an N x C x H x W (images, in [-1, 1]) or N x D (vectors) float32 array in data space. Sample
``i`` comes from seed ``(seed, i)``, so the file does not depend on ``batch_size``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_diff.checkpoints import fetch_checkpoint, load_model
from lightning_diff.cli import CONF_DIR, entry_point, pick_device
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.generation import generate
from lightning_diff.plotting import save_samples_figure
from lightning_diff.summary import run_summary

log = logging.getLogger("lightning_diff.cli.sample")


def build_sampler(cfg: DictConfig, model) -> Sampler:
    """The sampler of ``cfg.sampler`` if given, else the model's own; ``cfg.num_steps`` overrides steps
    and ``cfg.compile`` (when not null) the sampler's ``compile`` mode."""
    sampler = instantiate(cfg.sampler) if cfg.get("sampler") else model.sampler
    if cfg.get("num_steps"):
        sampler = sampler.with_num_steps(cfg.num_steps)
    if cfg.get("compile") is not None:
        sampler = sampler.with_compile(cfg.compile)
    return sampler


def sample(cfg: DictConfig):
    """Load ``cfg.ckpt``, draw ``cfg.num_samples`` samples, save them to ``cfg.out``; returns the array."""
    local = fetch_checkpoint(cfg.ckpt)  # a path, or a wandb Artifact downloaded
    model, _ = load_model(local, pick_device(cfg.device))
    sampler = build_sampler(cfg, model)
    data_shape = tuple(model.run_meta["data_shape"])
    samples, nfe = generate(
        model,
        range(cfg.num_samples),
        data_shape,
        sampler,
        cfg.seed,
        cfg.batch_size,
        cfg.use_ema,
        cfg.get("noise", "generators"),
    )
    array = samples.float().cpu().numpy()
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, array)
    if cfg.get("grid"):
        save_samples_figure(samples[:64], cfg.grid)
    title = (
        f"ld-sample finished: {len(array)} samples {data_shape} of {cfg.ckpt} "
        f"(step {model.global_step_loaded}) with {sampler!r}, {nfe} model evaluations each"
    )
    paths = {"samples": out, "grid": cfg.get("grid") or None, "checkpoint": local}
    log.info("%s", run_summary(title, paths))
    return array


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
@entry_point
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
