"""``ld-eval``: evaluate a checkpoint (by sampling from it) or a file of samples against data.

``ld-eval ckpt=PATH`` samples ``num_samples`` and compares them with the run's held-out data;
``ld-eval samples=FILE.npy data=digits`` scores samples from any source. With a checkpoint,
``likelihood.enabled=true`` adds the held-out negative log-likelihood through the probability-flow
ODE (bits/dim for images, nats/dim for vectors). Writes the metrics to ``metrics.json`` (the run
directory's, or ``out=``) and ends with a summary: the files, the metrics as a table.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_diff.checkpoints import fetch_checkpoint, load_model
from lightning_diff.cli import CONF_DIR, entry_point, pick_device, third_party_notices_hidden
from lightning_diff.cli.sample import build_sampler
from lightning_diff.errors import ConfigError, DataError
from lightning_diff.generation import gather_shards, generate, shard_indices
from lightning_diff.metrics.likelihood import heldout_data, likelihood_metrics, log_likelihoods
from lightning_diff.metrics.pipeline import (
    evaluate_samples,
    memorization_rows,
    require_samples,
    save_memorization_figures,
    wandb_table,
    write_metrics,
)
from lightning_diff.summary import run_summary

log = logging.getLogger("lightning_diff.cli.evaluate")


def samples_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file {path} does not exist: write one with ld-sample out={path}")
    return path


def load_samples(path: str | Path, data_shape: tuple[int, ...]) -> torch.Tensor:
    path = samples_file(path)
    array = np.load(path, allow_pickle=False)
    if tuple(array.shape[1:]) != tuple(data_shape):
        raise DataError(
            f"samples in {path} have shape {array.shape[1:]} but the data has {data_shape}: "
            "pick the data= of the model that made them"
        )
    if array.dtype == np.uint8:
        return torch.from_numpy(array).float() / 127.5 - 1
    return torch.from_numpy(array.astype(np.float32))


def heldout_likelihood(cfg: DictConfig, model, datamodule, rank: int = 0, world_size: int = 1, gather=None):
    """``bits_per_dim`` or ``nll_nats_per_dim`` of ``likelihood.num_samples`` held-out samples
    (a fixed random draw; row ``i`` draws its probes from ``(sample_seed, i)``). Under DDP each rank
    integrates its contiguous block of rows and ``gather`` (Fabric's) collects them."""
    options = OmegaConf.to_container(cfg.likelihood, resolve=True)
    options.pop("enabled")
    data = heldout_data(datamodule, options.pop("num_samples"))
    block = shard_indices(len(data), rank, world_size)
    logp, nfe = log_likelihoods(
        model, data[block.start : block.stop], block, cfg.sample_seed, cfg.batch_size, cfg.use_ema, **options
    )
    logp = gather_shards(gather, logp, len(data), world_size)
    nfe = gather_shards(gather, nfe, len(data), world_size)
    return likelihood_metrics(logp, nfe, tuple(datamodule.data_shape))


def checkpoint_metrics_path(run_dir: Path, step: int) -> Path:
    """Where ``ld-eval`` writes a checkpoint's metrics by default: the run's ``metrics.json`` (its
    latest evaluation, which ``ld-compare`` reads), unless that file already describes a later step;
    then ``eval/metrics_step<step>.json``, so that an earlier checkpoint's numbers never stand in for
    the run's final ones."""
    summary = run_dir / "metrics.json"
    if summary.is_file():
        described = json.loads(summary.read_text()).get("step")
        if isinstance(described, (int, float)) and described > step:
            return run_dir / "eval" / f"metrics_step{step:07d}.json"
    return summary


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
    """Sample from ``cfg.ckpt`` or read ``cfg.samples``; compare with the data; write and return metrics.

    With ``devices=N`` (N > 1) N processes (one per GPU, or gloo processes on the CPU) share the work:
    each samples and featurises a contiguous block of sample indices (and of held-out rows for the
    likelihood), every metric reduces its states across them, and rank 0 writes the files. Sample
    ``i`` comes from ``(sample_seed, i)`` on any number of processes, so the metrics are those of one.
    """
    if bool(cfg.get("ckpt")) == bool(cfg.get("samples")):
        raise ConfigError("give exactly one of ckpt=PATH or samples=FILE.npy (with data=...)")
    likelihood = cfg.get("likelihood") or {}
    if likelihood.get("enabled") and not cfg.ckpt:
        raise ConfigError("likelihood.enabled=true needs a model: pass ckpt=PATH instead of samples=")
    if not cfg.ckpt and not cfg.get("data"):
        raise ConfigError("samples=FILE.npy needs data=NAME (the data set to compare with), e.g. data=digits")
    devices = cfg.get("devices", 1)
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"devices={devices} is not a process count: give devices=1 or more (one per GPU)")
    # The sample count is checked here, before any process starts.
    if cfg.ckpt:
        count = int(cfg.num_samples)
        problem = f"num_samples={count} is too few for devices={devices}: give num_samples="
    else:
        count = len(np.load(samples_file(cfg.samples), mmap_mode="r", allow_pickle=False))
        problem = f"{cfg.samples} holds {count} sample(s): evaluating on {devices} process(es) needs "
    require_samples(count, devices, problem)
    # Resolve once, here: the checkpoint (a wandb Artifact is downloaded once) and every interpolation.
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    local = fetch_checkpoint(cfg.ckpt) if cfg.ckpt else None
    if devices == 1:
        result = _evaluate(cfg, local, pick_device(cfg.device))
    else:
        from lightning.fabric import Fabric

        device = pick_device(cfg.device)
        if device.type == "cuda" and devices > torch.cuda.device_count():
            raise ConfigError(
                f"devices={devices} but {torch.cuda.device_count()} GPUs are visible: give devices=N with N "
                "at most the GPU count (or device=cpu for gloo processes)"
            )
        fabric = Fabric(accelerator=device.type, devices=devices, strategy="ddp_spawn")
        result = fabric.launch(_evaluate_on, cfg, local)
    metrics, title, paths, named, wandb_where = result
    log.info("%s", run_summary(title, paths, named, wandb_where))
    return metrics


def _evaluate_on(fabric, cfg: DictConfig, local: Path | None):
    """One of ``fabric.world_size`` processes of a sharded ``ld-eval``."""
    if fabric.global_rank == 0:  # spawned processes start without the CLI's logging and filters
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    with third_party_notices_hidden():
        result = _evaluate(cfg, local, fabric.device, fabric)
    # The processes leave the group together and close it: one that exited while the group's
    # threads still ran was aborted ("terminate called without an active exception").
    fabric.barrier()
    torch.distributed.destroy_process_group()
    return result


def _evaluate(cfg: DictConfig, local: Path | None, device: torch.device, fabric=None):
    """This process's share of the evaluation; rank 0 writes the files. Returns the metrics and what
    the summary shows."""
    rank, world_size = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    extra: dict = {}
    if local is not None:
        model, run_cfg = load_model(local, device)
        datamodule = instantiate(cfg.data) if cfg.get("data") else instantiate(run_cfg.data)
        datamodule.setup("fit")
        sampler = build_sampler(cfg, model)
        num_samples = int(cfg.num_samples)
        mine, nfe = generate(
            model,
            shard_indices(num_samples, rank, world_size),
            tuple(datamodule.data_shape),
            sampler,
            cfg.sample_seed,
            cfg.batch_size,
            cfg.use_ema,
            cfg.get("noise", "generators"),
        )
        if (cfg.get("likelihood") or {}).get("enabled"):
            extra.update(heldout_likelihood(cfg, model, datamodule, rank, world_size, fabric))
        extra = {"nfe": float(nfe), **extra}
        step = int(getattr(model, "global_step_loaded", 0))
        run_dir = local.resolve().parent.parent
        default_out, figures_dir = checkpoint_metrics_path(run_dir, step), run_dir / "eval"
        meta = {"ckpt": str(cfg.ckpt), "step": step, "sampler": repr(sampler)}
    else:
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        every = load_samples(cfg.samples, tuple(datamodule.data_shape))
        num_samples = len(every)
        block = shard_indices(num_samples, rank, world_size)
        mine = every[block.start : block.stop].to(device)
        default_out = Path(cfg.samples).with_suffix(".metrics.json")
        figures_dir = default_out.parent / "eval"
        meta = {"samples": str(cfg.samples)}
    inception_options = OmegaConf.to_container(cfg.inception, resolve=True) if cfg.get("inception") else None
    metrics, suite = evaluate_samples(
        mine,
        datamodule,
        cfg.feature_space,
        cfg.kid,
        cfg.sample_seed,
        cfg.cache_dir,
        inception_options,
        rank,
        world_size,
        num_samples,
    )
    metrics.update(extra)
    samples = gather_shards(fabric, mine, num_samples, world_size).cpu()
    named = {f"eval/{k}": v for k, v in metrics.items()}
    out_path = Path(cfg.out or default_out)
    if cfg.out:
        figures_dir = out_path.parent / "eval"
    if rank == 0:
        out = write_metrics(out_path, named, num_samples=num_samples, devices=world_size, **meta)
    figures = save_memorization_figures(
        suite,
        samples,
        datamodule.train_tensor(),
        figures_dir,
        "ld_eval",
        cfg.num_pairs,
        write=rank == 0,
    )
    wandb_where = None
    if cfg.get("wandb") and cfg.wandb.enabled:
        rows = memorization_rows(suite, samples, datamodule.train_tensor(), cfg.wandb.table_rows)
        if rank == 0:
            table = wandb_table(rows) if rows else None
            wandb_where = log_to_wandb(cfg, named, figures, figures_dir.parent, table)
    if rank != 0:
        return metrics, "", {}, named, None
    source = f"{cfg.ckpt} (step {meta['step']})" if cfg.ckpt else str(cfg.samples)
    on = f" on {world_size} processes" if world_size > 1 else ""
    title = f"ld-eval finished: {num_samples} samples of {source}{on}"
    paths = {"metrics": out, "figures": figures[0].parent if figures else None}
    return metrics, title, paths, named, wandb_where


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
@entry_point
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
