"""``ld-eval``: evaluate a checkpoint (by sampling from it) or a file of samples against data.

``ld-eval ckpt=PATH`` samples ``num_samples`` and compares them with the run's held-out data;
``ld-eval samples=FILE.npy data=digits`` scores samples from any source. With a checkpoint,
``likelihood.enabled=true`` adds the held-out negative log-likelihood through the probability-flow
ODE (bits/dim for images, nats/dim for vectors). Writes the metrics to ``metrics.json`` (the run
directory's, or ``out=``) and ends with a summary: the files, the metrics as a table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_diff.checkpoints import fetch_checkpoint, load_model
from lightning_diff.cli import CONF_DIR, entry_point, pick_device
from lightning_diff.cli.sample import build_sampler
from lightning_diff.errors import ConfigError, DataError
from lightning_diff.generation import generate
from lightning_diff.metrics.likelihood import heldout_data, likelihood_metrics, log_likelihoods
from lightning_diff.metrics.pipeline import (
    evaluate_samples,
    memorization_rows,
    save_memorization_figures,
    wandb_table,
    write_metrics,
)
from lightning_diff.summary import run_summary

log = logging.getLogger("lightning_diff.cli.evaluate")


def load_samples(path: str | Path, data_shape: tuple[int, ...]) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file {path} does not exist: write one with ld-sample out={path}")
    array = np.load(path, allow_pickle=False)
    if tuple(array.shape[1:]) != tuple(data_shape):
        raise DataError(
            f"samples in {path} have shape {array.shape[1:]} but the data has {data_shape}: "
            "pick the data= of the model that made them"
        )
    if array.dtype == np.uint8:
        return torch.from_numpy(array).float() / 127.5 - 1
    return torch.from_numpy(array.astype(np.float32))


def heldout_likelihood(cfg: DictConfig, model, datamodule) -> dict[str, float]:
    """``bits_per_dim`` or ``nll_nats_per_dim`` of ``likelihood.num_samples`` held-out samples
    (a fixed random draw)."""
    options = OmegaConf.to_container(cfg.likelihood, resolve=True)
    options.pop("enabled")
    data = heldout_data(datamodule, options.pop("num_samples"))
    logp, nfe = log_likelihoods(
        model, data, range(len(data)), cfg.sample_seed, cfg.batch_size, cfg.use_ema, **options
    )
    return likelihood_metrics(logp, nfe, tuple(datamodule.data_shape))


def log_to_wandb(
    cfg: DictConfig, named: dict[str, float], figures: list[Path], save_dir: Path, table=None
) -> str:
    """One wandb run per evaluation: the resolved config, the metrics, the figures and the table of
    the most memorized samples. Returns where the run is (its page, or the ``wandb sync`` command of
    an offline run)."""
    import wandb

    from lightning_diff.loggers import wandb_mode

    run = wandb.init(
        project=cfg.wandb.project,
        name=cfg.wandb.name,
        group=cfg.wandb.group,
        mode=wandb_mode(cfg.wandb.mode),
        dir=str(save_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        job_type="eval",
    )
    images = {f"eval/{p.stem}": wandb.Image(str(p)) for p in figures}
    run.log({**named, **images, "eval/samples": table} if table is not None else {**named, **images})
    folder = Path(run.dir).parent  # the run's files/ folder sits in the folder wandb sync takes
    where = run.url if not run.offline else f"offline; upload with: wandb sync {folder}"
    run.finish()
    return where


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Sample from ``cfg.ckpt`` or read ``cfg.samples``; compare with the data; write and return metrics."""
    if bool(cfg.get("ckpt")) == bool(cfg.get("samples")):
        raise ConfigError("give exactly one of ckpt=PATH or samples=FILE.npy (with data=...)")
    likelihood = cfg.get("likelihood") or {}
    if likelihood.get("enabled") and not cfg.ckpt:
        raise ConfigError("likelihood.enabled=true needs a model: pass ckpt=PATH instead of samples=")
    extra: dict = {}
    if cfg.ckpt:
        local = fetch_checkpoint(cfg.ckpt)  # a path, or a wandb Artifact downloaded
        model, run_cfg = load_model(local, pick_device(cfg.device))
        datamodule = instantiate(cfg.data) if cfg.get("data") else instantiate(run_cfg.data)
        datamodule.setup("fit")
        sampler = build_sampler(cfg, model)
        samples, nfe = generate(
            model,
            range(cfg.num_samples),
            tuple(datamodule.data_shape),
            sampler,
            cfg.sample_seed,
            cfg.batch_size,
            cfg.use_ema,
        )
        extra = {"nfe": float(nfe)}
        if likelihood.get("enabled"):
            extra.update(heldout_likelihood(cfg, model, datamodule))
        default_out = local.resolve().parent.parent / "metrics.json"
        meta = {
            "ckpt": str(cfg.ckpt),
            "step": getattr(model, "global_step_loaded", 0),
            "sampler": repr(sampler),
        }
    else:
        if not cfg.get("data"):
            raise ConfigError(
                "samples=FILE.npy needs data=NAME (the data set to compare with), e.g. data=digits"
            )
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        samples = load_samples(cfg.samples, tuple(datamodule.data_shape))
        default_out = Path(cfg.samples).with_suffix(".metrics.json")
        meta = {"samples": str(cfg.samples)}
    inception_options = OmegaConf.to_container(cfg.inception, resolve=True) if cfg.get("inception") else None
    metrics, suite = evaluate_samples(
        samples, datamodule, cfg.feature_space, cfg.kid, cfg.sample_seed, cfg.cache_dir, inception_options
    )
    metrics.update(extra)
    named = {f"eval/{k}": v for k, v in metrics.items()}
    out_path = Path(cfg.out or default_out)
    out = write_metrics(out_path, named, num_samples=len(samples), **meta)
    figures = save_memorization_figures(
        suite, samples, datamodule.train_tensor(), out_path.parent / "eval", "ld_eval", cfg.num_pairs
    )
    wandb_where = None
    if cfg.get("wandb") and cfg.wandb.enabled:
        rows = memorization_rows(suite, samples, datamodule.train_tensor(), cfg.wandb.table_rows)
        wandb_where = log_to_wandb(cfg, named, figures, out_path.parent, wandb_table(rows) if rows else None)
    source = f"{cfg.ckpt} (step {meta['step']})" if cfg.ckpt else str(cfg.samples)
    title = f"ld-eval finished: {len(samples)} samples of {source}"
    paths = {"metrics": out, "figures": figures[0].parent if figures else None}
    log.info("%s", run_summary(title, paths, named, wandb_where))
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@entry_point
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
