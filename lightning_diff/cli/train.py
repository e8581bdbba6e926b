"""``ld-train``: train a model family on a DataModule; everything is built from ``conf/train.yaml``.

``train(cfg)`` is the recipe (tests call it directly); ``main`` is only the Hydra wrapper.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_diff.callbacks.best_weights import BestWeights
from lightning_diff.callbacks.preemption import PreemptionCheckpoint
from lightning_diff.checkpoints import AtomicCheckpointIO, build_family_net, find_last, read_checkpoint
from lightning_diff.cli import CONF_DIR, entry_point, launcher_plugin_required
from lightning_diff.errors import ConfigError
from lightning_diff.loggers import WANDB_ID_FILE, data_name, family_name, fill_wandb_labels, trim_csv_log
from lightning_diff.summary import latest_file, run_summary, wandb_line

log = logging.getLogger("lightning_diff.cli.train")

# The training DataModules resume mid-epoch through their own state (see data/sampler.py), which
# Lightning cannot see; its warning that the loader is not resumable does not apply.
warnings.filterwarnings(
    "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
)


#: Set while ``fit`` runs to the run directory, so that the processes Lightning relaunches for
#: ``strategy=ddp`` (they compose the config again) use the same directory: ``conf/train.yaml``
#: reads it in ``run_dir``'s default.
RUN_DIR_ENV = "LD_RUN_DIR"


def _resume_point(resume: str | None, run_dir: Path) -> tuple[str | None, int]:
    if resume in (None, "", "none"):
        return None, 0
    if resume == "auto":
        path = find_last(run_dir)
        if path is None:
            log.info("resume=auto: no checkpoint in %s, starting a fresh run", run_dir)
            return None, 0
    else:
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"resume={resume} does not exist: pass resume=auto or a path to a .ckpt file")
    ckpt = read_checkpoint(path)
    return str(path), int(ckpt.get("global_step", 0))


@contextlib.contextmanager
def kept_signal_handlers(names: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
    """Put back the handlers of ``names`` after the block (Lightning's teardown after an exception
    can leave the training-time ones installed)."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (getattr(signal, n) for n in names if hasattr(signal, n))}
    try:
        yield
    finally:
        if main:
            for signum, handler in saved.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``None`` (fresh), ``auto`` (the run directory's last.ckpt if
    any) or an explicit path. The file is read once here so a corrupt one fails with a clear line
    before any training starts."""
    return _resume_point(resume, run_dir)[0]


@contextlib.contextmanager
def exported_run_dir(run_dir: Path):
    """Set :data:`RUN_DIR_ENV` to ``run_dir`` for the duration of the block, then restore it."""
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a mapping (loggers, callbacks); skips nulls."""
    if not cfg:
        return []
    return [instantiate(v) for v in cfg.values() if v is not None and "_target_" in v]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build data, net, model, loggers, callbacks and trainer from ``cfg``; fit; return (metrics, objects)."""
    run_dir = Path(cfg.run_dir)
    ckpt_path, resume_step = _resume_point(cfg.get("resume"), run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    data_shape = tuple(datamodule.data_shape)
    net = build_family_net(cfg, data_shape)
    model = instantiate(cfg.model, net=net)
    # The data's Gaussian, and per family preconditioning statistics, analytic fits, kernel centres.
    model.fit_data(datamodule.train_tensor(), gaussian_reference=cfg.get("gaussian_reference", True))

    fill_wandb_labels(cfg)
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    # Weights restored at the end of training must be in place before anything samples from them.
    callbacks.sort(key=lambda c: not isinstance(c, BestWeights))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    model.noise_seed = int(cfg.seed)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    model.run_meta = {"config": resolved, "data_shape": list(data_shape), "run_dir": str(run_dir)}
    if trainer.is_global_zero:
        OmegaConf.save(OmegaConf.create(resolved), run_dir / "config.yaml")
        if ckpt_path is not None:
            for logger in loggers:
                if isinstance(logger, CSVLogger):
                    trim_csv_log(logger, resume_step)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    log.info("training %s on %s, run directory %s", type(model).__name__, type(datamodule).__name__, run_dir)
    preemption = next((c for c in callbacks if isinstance(c, PreemptionCheckpoint)), None)
    with exported_run_dir(run_dir), kept_signal_handlers():
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            # Lightning ends fit this way after SIGTERM; the callback has saved the step by then.
            if preemption is None or preemption.stopped_by is None:
                raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    url = wandb_url(loggers)
    finish_wandb(loggers)
    objects = {"model": model, "datamodule": datamodule, "trainer": trainer, "run_dir": run_dir}
    objects["stopped_by"] = preemption.stopped_by if preemption is not None else None
    if objects["stopped_by"] and trainer.is_global_zero:
        log.warning(
            "stopped by %s at step %d; checkpoint %s; "
            "continue with the same command plus run_dir=%s resume=auto",
            preemption.stopped_by,
            trainer.global_step,
            preemption.path,
            run_dir,
        )
    if trainer.is_global_zero:
        log.info("%s", training_summary(objects, cfg, url))
    return metrics, objects


def training_summary(objects: dict[str, Any], cfg: DictConfig, url: str | None) -> str:
    """What a finished (or stopped) training run left and what its last evaluation said."""
    run_dir, trainer = objects["run_dir"], objects["trainer"]
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    ending = f"stopped by {objects['stopped_by']}" if objects["stopped_by"] else "finished"
    title = (
        f"ld-train {ending}: {family_name(cfg.model)} on {data_name(cfg.data)}, step {trainer.global_step}"
    )
    paths = {
        "run dir": run_dir,
        "checkpoint": find_last(run_dir),
        "samples": latest_file(run_dir / "samples", "*.png"),
        "metrics": metrics_path if metrics else None,
    }
    return run_summary(title, paths, metrics, wandb_line(run_dir, run_id, url))


def wandb_url(loggers: list[Any]) -> str | None:
    """The page of an online wandb run (None offline or without wandb)."""
    for lg in loggers:
        run = getattr(lg, "_experiment", None) if isinstance(lg, WandbLogger) else None
        if run is not None and not run.offline:  # an existing run only: never start one here
            return run.url
    return None


def finish_wandb(loggers: list[Any]) -> None:
    """Close the wandb run, so that the next run of the same process (a Hydra multirun job) starts its own."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def refuse_multiprocess_multirun(cfg: DictConfig) -> None:
    """Hydra multirun runs its jobs in one process; a DDP strategy inside such a job (several devices,
    or any ``ddp`` strategy) relaunches or spawns processes that re-enter the sweep. Refuse it."""
    devices = cfg.trainer.get("devices", 1)
    strategy = str(cfg.trainer.get("strategy", "auto"))
    several = devices in ("auto", -1, "-1") or (isinstance(devices, int) and devices > 1)
    if several or "ddp" in strategy:
        raise ConfigError(
            f"ld-train -m (Hydra multirun) with trainer.devices={devices} trainer.strategy={strategy} is not "
            "supported: sweep with one job per configuration (a wandb agent or a SLURM array, see "
            "sweeps/README.md), or run the multirun with trainer.devices=1"
        )


def multirun_run_dir(cfg: DictConfig) -> None:
    """Under ``-m`` (multirun) each job writes to its own Hydra job directory,
    ``hydra.sweep.dir/hydra.sweep.subdir`` (``runs/<name>/<date_time>/<job number>``), instead of the
    single-run default, which is the same for every job of a sweep. An explicit ``run_dir=`` is kept."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    refuse_multiprocess_multirun(cfg)
    if any(item.split("=", 1)[0].lstrip("+~") == "run_dir" for item in hydra_cfg.overrides.task):
        return
    with open_dict(cfg):
        cfg.run_dir = hydra_cfg.runtime.output_dir


@launcher_plugin_required
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@entry_point
def main(cfg: DictConfig) -> None:
    multirun_run_dir(cfg)
    _, objects = train(cfg)
    if objects["stopped_by"]:
        # The conventional status of a process ended by a signal: 128 + the signal's number.
        sys.exit(128 + int(getattr(signal, objects["stopped_by"])))


if __name__ == "__main__":
    main()
