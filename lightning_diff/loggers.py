"""Logger construction: wandb that never prompts or hangs, and keeps one run id per run directory."""

from __future__ import annotations

import csv
import netrc
import os
import secrets
import socket
import string
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import open_dict

from lightning_diff.errors import ConfigError

WANDB_ID_FILE = "wandb_id.txt"
WANDB_HOST = "api.wandb.ai"


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(mode: str = "auto") -> str:
    """``online`` only when asked for or when a key is configured and the server answers; else ``offline``.

    ``WANDB_MODE`` in the environment wins over ``auto``. Offline runs are written under the run
    directory and can be uploaded later with ``wandb sync``.
    """
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if has_wandb_key() and reachable(WANDB_HOST) else "offline"


def run_id(run_dir: str | Path) -> str:
    """The wandb run id of a run directory: read from ``wandb_id.txt``, or made and saved there.

    Keeping the id in the run directory lets ``resume=auto`` continue the same wandb run.
    """
    path = Path(run_dir) / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits
    new_id = "".join(secrets.choice(alphabet) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_id + "\n")
    return new_id


class RunWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` with checkpoints as Artifacts that work offline and say what they hold.

    ``log_model``: ``False`` (default), ``"all"`` (every checkpoint as it is written) or ``True``
    (at the end of a successful ``fit``, every checkpoint not logged yet), as in Lightning, with two
    differences:

    * offline runs keep their Artifacts (wandb stores them with the run; ``wandb sync`` uploads
      them), where Lightning refuses ``log_model`` with ``offline=True``;
    * each Artifact (type ``model``, one file ``model.ckpt``, named ``model-<run id>``) carries the
      checkpoint's ``step``, ``epoch`` and logged ``metrics`` as metadata (recorded by
      :class:`~lightning_diff.callbacks.RunCheckpoint`), with aliases ``latest`` on the newest,
      ``step<N>``, and ``best`` on the best checkpoint of a monitored metric or on the end-of-fit
      checkpoint of a run whose best weights were restored (``callbacks.best_weights``).

    wandb is not handed the deprecated ``anonymous`` setting (Lightning passes it even when unset, and
    wandb warns about it at every run).
    """

    def __init__(self, *args: Any, log_model: bool | str = False, **kwargs: Any):
        if log_model not in (False, True, "all"):
            raise ConfigError(f"logger.wandb.log_model={log_model!r}: use false, true or all")
        super().__init__(*args, log_model=False, **kwargs)
        self._wandb_init.pop("anonymous", None)
        self._artifacts_mode = log_model
        self._pending: dict[int, Any] = {}
        self._logged_states: set[tuple[Any, Any]] = set()  # (step, best weights) already uploaded

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if self._artifacts_mode == "all":
            self._log_checkpoints(checkpoint_callback)
        elif self._artifacts_mode:
            self._pending[id(checkpoint_callback)] = checkpoint_callback

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "success" and self._experiment is not None:
            for callback in self._pending.values():
                self._log_checkpoints(callback)

    def _log_checkpoints(self, checkpoint_callback: Any) -> None:
        import wandb
        from lightning.pytorch.loggers.utilities import _scan_checkpoints

        saved = getattr(checkpoint_callback, "saved_meta", {})
        best_path = getattr(checkpoint_callback, "best_model_path", "")
        monitored = getattr(checkpoint_callback, "monitor", None) is not None
        for mtime, path, _, _ in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            meta = {**saved.get(str(path), {}), "original_filename": Path(path).name}
            self._logged_model_time[path] = mtime
            held = (meta.get("step"), meta.get("best_weights"))
            if held[0] is not None and held in self._logged_states:
                continue  # last.ckpt repeating the periodic checkpoint of the same step
            self._logged_states.add(held)
            aliases = ["latest"]
            if meta.get("step") is not None:
                aliases.append(f"step{meta['step']}")
            if (monitored and path == best_path) or meta.get("best_weights"):
                aliases.append("best")
            artifact = wandb.Artifact(name=f"model-{self.experiment.id}", type="model", metadata=meta)
            artifact.add_file(path, name="model.ckpt", policy=self.add_file_policy)
            self.experiment.log_artifact(artifact, aliases=aliases)


def make_wandb_logger(
    save_dir: str,
    project: str = "lightning_diff",
    name: str | None = None,
    mode: str = "auto",
    entity: str | None = None,
    tags: list[str] | None = None,
    group: str | None = None,
    log_model: bool | str = False,
) -> RunWandbLogger:
    """A :class:`RunWandbLogger` in ``mode`` (auto/online/offline/disabled) resuming the run directory's
    id; ``log_model`` as there."""
    resolved = wandb_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    return RunWandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        id=run_id(save_dir),
        resume="allow",
        offline=resolved == "offline",
        mode=resolved,
        entity=entity,
        tags=list(tags) if tags else None,
        group=group,
        log_model=log_model,
    )


def _short(target: str | None) -> str:
    return str(target or "").rsplit(".", 1)[-1]


def family_name(model_cfg) -> str:
    """The model family: the model class (``DDPM``, ``ScoreSDE``), or the analytic model's ``kind``."""
    name = _short(model_cfg.get("_target_"))
    kind = model_cfg.get("kind")
    return str(kind) if name == "AnalyticModel" and kind else name or "model"


def data_name(data_cfg) -> str:
    """A short data set name: the torchvision ``dataset``, the synthetic distribution's class, or the
    DataModule's class without ``DataModule`` (``digits``, ``twomoons``, ``cifar10``, ``array``)."""
    if data_cfg.get("dataset"):
        return str(data_cfg.dataset).lower()
    distribution = data_cfg.get("distribution")
    if distribution is not None and distribution.get("_target_"):
        return _short(distribution._target_).lower()
    return _short(data_cfg.get("_target_")).removesuffix("DataModule").lower() or "data"


def sampler_name(sampler_cfg) -> str:
    """``ddim``, ``heun``, ``teleport_ddim``, ...: the sampling function without ``sample_``."""
    if sampler_cfg is None:
        return "none"
    if _short(sampler_cfg.get("_target_")) == "Teleport":
        return "teleport_" + sampler_name(sampler_cfg.get("sampler"))
    fn = sampler_cfg.get("fn") or {}
    return _short(fn.get("_target_")).removeprefix("sample_") or _short(sampler_cfg.get("_target_")).lower()


def run_labels(cfg) -> dict:
    """Default wandb ``group`` (``<data>-<family>``) and ``tags`` (family, data, training-set size,
    sampler) of a training config, so dashboards can group runs by any of them."""
    family, data = family_name(cfg.model), data_name(cfg.data)
    num_train = cfg.data.get("num_train")
    tags = [
        family,
        data,
        f"num_train={num_train if num_train is not None else 'full'}",
        f"sampler={sampler_name(cfg.get('sampler'))}",
    ]
    return {"group": f"{data}-{family}", "tags": tags}


def fill_wandb_labels(cfg) -> None:
    """Set ``logger.wandb.group`` and ``logger.wandb.tags`` from :func:`run_labels` where they are null;
    values given by the user (``logger.wandb.group=...``, ``logger.wandb.tags=[...]``) are kept."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None:
        return
    labels = run_labels(cfg)
    with open_dict(cfg):
        for key in ("group", "tags"):
            if wandb_cfg.get(key) is None:
                wandb_cfg[key] = labels[key]


def trim_csv_log(logger: CSVLogger, step: int) -> int:
    """Before a run resumed from a checkpoint at global step ``step`` logs anything: keep the CSV rows
    logged before ``step`` and drop the others, which the resumed run logs again (or which belonged
    to steps trained after the checkpoint and lost with the process). Call on rank 0 before the
    logger's first use: Lightning's CSV writer deletes an existing metrics file when it starts, so
    the kept rows are read first and logged again through the logger. Returns the number of rows
    kept."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        kept = [
            row
            for row in csv.DictReader(f)
            if row.get("step") not in (None, "") and float(row["step"]) < step
        ]
    logger.experiment  # noqa: B018 - creating the writer removes the old file
    for row in kept:
        at = int(float(row.pop("step")))
        logger.log_metrics({key: _csv_number(value) for key, value in row.items() if value}, at)
    logger.save()
    return len(kept)


def _csv_number(text: str) -> int | float:
    """A CSV cell back as the number Lightning wrote (``str`` of an int or a float: exact)."""
    return int(text) if text.lstrip("-").isdigit() else float(text)
