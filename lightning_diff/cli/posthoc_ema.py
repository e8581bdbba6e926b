"""``ld-posthoc-ema ckpt=PATH sigma_rel=0.08 out=PATH``: a checkpoint whose EMA is rebuilt post hoc.

    ld-posthoc-ema ckpt=runs/x/checkpoints/last.ckpt sigma_rel=0.08 out=runs/x/last-ema0.08.ckpt
    ld-sample ckpt=runs/x/last-ema0.08.ckpt          # and ld-eval: it is an ordinary checkpoint

Reads the snapshots that :class:`~lightning_diff.callbacks.ema_snapshots.PosthocEMA` wrote during
training (``<run_dir>/posthoc_ema/``, the run directory being the one ``ckpt`` lies in, or the one
recorded in it; ``snapshots=DIR`` names another), rebuilds the power-function EMA of width
``sigma_rel`` at the checkpoint's step from those taken at or before it (Karras et al. 2024, App. C.2;
see :func:`~lightning_diff.callbacks.ema_snapshots.reconstruct`), and writes a copy of ``ckpt`` whose
``ema.module.*`` weights are the rebuilt ones. Raw weights, optimiser, config and everything else are
unchanged; the run metadata gains a ``posthoc_ema`` entry (width, snapshot steps, coefficients, fit
residual).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from lightning_diff.callbacks.ema_snapshots import reconstruct, sigma_rel_to_gamma
from lightning_diff.checkpoints import AtomicCheckpointIO, read_checkpoint
from lightning_diff.cli import CONF_DIR, entry_point
from lightning_diff.errors import CheckpointError, ConfigError
from lightning_diff.models.diffusion_module import CHECKPOINT_KEY

log = logging.getLogger("lightning_diff.cli.posthoc_ema")
SNAPSHOT_DIR = "posthoc_ema"
EMA_PREFIX = "ema.module."


def snapshot_dir(ckpt_path: Path, meta: dict[str, Any], snapshots: str | None) -> Path:
    """``snapshots`` if given; else ``posthoc_ema/`` of the run directory that holds ``ckpt_path``
    (``<run_dir>/checkpoints/x.ckpt``), or of the run directory recorded in the checkpoint."""
    if snapshots:
        return Path(snapshots)
    candidates = []
    if ckpt_path.parent.name == "checkpoints":
        candidates.append(ckpt_path.parent.parent / SNAPSHOT_DIR)
    if meta.get("run_dir"):
        candidates.append(Path(meta["run_dir"]) / SNAPSHOT_DIR)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    where = " or ".join(str(c) for c in candidates) or f"the run directory of {ckpt_path}"
    raise CheckpointError(
        f"no post-hoc EMA snapshots in {where}: train with callbacks=with_posthoc_ema, or pass snapshots=DIR"
    )


def posthoc_ema(cfg: DictConfig) -> Path:
    """Write ``cfg.out``: ``cfg.ckpt`` with its EMA weights rebuilt at ``cfg.sigma_rel``; returns the path."""
    sigma_rel_to_gamma(cfg.sigma_rel)  # a width out of range fails before any file is read
    ckpt_path = Path(cfg.ckpt)
    default = ckpt_path.with_name(f"{ckpt_path.stem}-ema{cfg.sigma_rel}.ckpt")
    out = Path(cfg.out) if cfg.get("out") else default
    if out.resolve() == ckpt_path.resolve():
        raise ConfigError(f"out={out} is the input checkpoint: write the result to another file")
    ckpt = read_checkpoint(ckpt_path)
    meta = ckpt[CHECKPOINT_KEY]
    step = int(ckpt.get("global_step", 0))
    directory = snapshot_dir(ckpt_path, meta, cfg.get("snapshots"))
    weights, info = reconstruct(directory, float(cfg.sigma_rel), step)
    state = ckpt["state_dict"]
    for name, value in weights.items():
        key = EMA_PREFIX + name
        if key not in state or state[key].shape != value.shape:
            raise CheckpointError(f"the snapshots in {directory} do not match {ckpt_path} ({key})")
        state[key] = value.to(state[key].dtype)
    missing = [k for k in state if k.startswith(EMA_PREFIX) and k[len(EMA_PREFIX) :] not in weights]
    if missing:
        raise CheckpointError(f"the snapshots in {directory} lack {missing[0]} of {ckpt_path}")
    meta["posthoc_ema"] = info
    AtomicCheckpointIO().save_checkpoint(ckpt, out)
    last, start = info["snapshot_steps"][-1], info["start_step"]
    if last != step:
        log.warning(
            "last snapshot at step %d, checkpoint at step %d: the steps between are not covered", last, step
        )
    if start:
        log.warning("the profiles started at step %d: they count earlier weights as that step's", start)
    log.info(
        "wrote %s: EMA sigma_rel=%g (gamma %.3f) at step %d from %d snapshots, relative fit residual %.2e",
        out, info["sigma_rel"], info["gamma"], step, len(info["snapshot_steps"]), info["residual"],
    )  # fmt: skip
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="posthoc_ema")
@entry_point
def main(cfg: DictConfig) -> None:
    posthoc_ema(cfg)


if __name__ == "__main__":
    main()
