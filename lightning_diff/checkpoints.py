"""Reading checkpoints back: validation with clear errors, and rebuilding a model for sampling."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_diff.errors import CheckpointError
from lightning_diff.models.diffusion_module import CHECKPOINT_KEY, DiffusionModule

LAST = "last.ckpt"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's contents on the CPU with ``weights_only=True`` (no arbitrary code runs).

    Raises :class:`CheckpointError` naming the file and the fix when it is missing, unreadable or not
    written by lightning_diff.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist: check ckpt=PATH (runs keep them in checkpoints/)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, so it is not a lightning_diff "
            "checkpoint (or it is corrupt): pass a .ckpt written by ld-train"
        ) from err
    except Exception as err:  # torch reports truncated or garbled files with many exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({first[:120]}); use an earlier file from "
            "its checkpoints/ folder"
        ) from err
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a lightning_diff checkpoint: pass a .ckpt written by ld-train")
    return ckpt


def find_last(run_dir: str | Path) -> Path | None:
    """The newest of ``run_dir/checkpoints/last.ckpt`` and the ``run_dir/hpc_ckpt_<n>.ckpt`` files that
    Lightning's SLURM environment writes on the requeue signal; None when there is neither."""
    candidates = [Path(run_dir) / "checkpoints" / LAST, *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    found = [p for p in candidates if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def build_family_net(cfg: DictConfig, data_shape: tuple[int, ...]) -> torch.nn.Module:
    """The network of the ``net`` group (``net=auto|mlp|unet|precision_field``) built for ``data_shape``;
    ``model=kernel_wpo`` selects ``precision_field`` itself."""
    return instantiate(cfg.net, data_shape=data_shape)


def stored_config(meta: dict[str, Any]) -> DictConfig:
    """The run config stored in a checkpoint. Checkpoints of kernel WPO runs written before the
    precision field became the ``net=precision_field`` option keep it under ``model.net``; it is
    moved to ``net``, where the current code builds it from."""
    cfg = OmegaConf.create(meta["config"])
    if "net" in cfg.model:
        with open_dict(cfg):
            cfg.net = cfg.model.pop("net")
    return cfg


WANDB_PREFIX = "wandb:"


def artifact_cache() -> Path:
    """Where ``ckpt=wandb:...`` downloads go: ``$LD_CACHE_DIR/artifacts``, by default under
    ``~/.cache/lightning_diff``."""
    return Path(os.environ.get("LD_CACHE_DIR", "~/.cache/lightning_diff")).expanduser() / "artifacts"


def fetch_checkpoint(ckpt: str | Path) -> Path:
    """A local file for ``ckpt``: the path itself, or for ``wandb:<entity>/<project>/<artifact>:<alias>``
    the ``model.ckpt`` of that wandb Artifact (as ``logger.wandb.log_model`` stores them), downloaded
    once per version to ``<cache>/<entity>/<project>/<artifact>-<version>/checkpoints/``."""
    text = str(ckpt)
    if not text.startswith(WANDB_PREFIX):
        return Path(text)
    name = text.removeprefix(WANDB_PREFIX)
    if name.count("/") != 2 or ":" not in name.rsplit("/", 1)[-1]:
        raise CheckpointError(
            f"ckpt={text}: write ckpt=wandb:<entity>/<project>/<artifact>:<alias>, "
            "for example wandb:me/lightning_diff/model-abc123:latest"
        )
    from lightning_diff.loggers import WANDB_HOST, has_wandb_key, reachable

    if not has_wandb_key():
        raise CheckpointError(f"ckpt={text} needs a wandb key: run `wandb login` or set WANDB_API_KEY")
    if not reachable(WANDB_HOST):
        raise CheckpointError(f"ckpt={text}: {WANDB_HOST} cannot be reached; download it where it can")
    import wandb

    try:
        artifact = wandb.Api(timeout=60).artifact(name, type="model")
        entity, project, _ = name.split("/")
        root = artifact_cache() / entity / project / artifact.name.replace(":", "-") / "checkpoints"
        path = root / "model.ckpt"
        if not path.is_file():
            artifact.download(root=str(root))
    except Exception as err:  # wandb raises its own errors, requests' and ValueError for bad names
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"ckpt={text}: wandb could not give the artifact ({first[:160]})") from err
    if not path.is_file():
        raise CheckpointError(f"ckpt={text}: the artifact has no model.ckpt (not logged by ld-train)")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[DiffusionModule, DictConfig]:
    """Rebuild the model of a checkpoint from the config stored in it, with raw and EMA weights loaded.
    ``path`` may name a wandb Artifact (:func:`fetch_checkpoint`)."""
    path = fetch_checkpoint(path)
    ckpt = read_checkpoint(path)
    meta = ckpt[CHECKPOINT_KEY]
    cfg = stored_config(meta)
    net = build_family_net(cfg, tuple(meta["data_shape"]))
    model: DiffusionModule = instantiate(cfg.model, net=net)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not match its own config ({str(err).splitlines()[0]})") from err
    model.run_meta = dict(meta)
    model.global_step_loaded = int(ckpt.get("global_step", 0))
    return model.to(device).eval(), cfg


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, made atomic: a checkpoint is written to a temporary file
    in the same folder, flushed to disk, then renamed over the target. A process killed while
    writing leaves the previous file (for example ``last.ckpt``) intact and no partial file behind
    (a hard kill can leave a ``.tmp-*`` file, never a corrupt checkpoint)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes the file private; checkpoints are ordinary files
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
