"""Every read of Lightning's internals, in one place: what lightning_diff needs and Lightning does
not expose publicly. Each function names what it reads; ``tests/test_lightning_internals.py`` checks
each against the installed Lightning, so an upgrade that moves one fails there, not silently.

- :func:`cluster_environment`: the trainer's cluster environment (``SLURMEnvironment`` and its
  requeue settings); strategies expose it only when they are parallel.
- :func:`slurm_requeue`: Lightning's own reaction to SLURM's requeue signal (checkpoint and
  ``scontrol requeue``), called at the end of a step instead of from the signal handler.
- :func:`fit_loop_counters`: where a checkpoint keeps the fit loop's progress counters (the layout
  of Lightning 2.5/2.6), for :func:`lightning_diff.resume.align_loop_state`.
- :func:`attached_trainer`: the module's trainer, or None outside ``fit``/``validate`` (the public
  ``LightningModule.trainer`` raises there).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import ClusterEnvironment


def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment | None:
    """The cluster environment Lightning selected for ``trainer`` (reads ``_accelerator_connector``)."""
    return getattr(trainer._accelerator_connector, "cluster_environment", None)


def slurm_requeue(trainer: L.Trainer, signum: int) -> None:
    """Lightning's reaction to SLURM's requeue signal: write ``default_root_dir/hpc_ckpt_<n>.ckpt``
    and, on rank 0, ``scontrol requeue`` the job (reads ``_signal_connector``)."""
    trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)


def fit_loop_counters(checkpoint: dict[str, Any]) -> tuple[dict, dict, dict] | None:
    """The fit loop's epoch progress, batch progress and epoch-loop state in ``checkpoint``, or None
    when they are not where Lightning 2.5/2.6 keeps them."""
    try:
        fit = checkpoint["loops"]["fit_loop"]
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        loop_state = fit["epoch_loop.state_dict"]
        keys = ("ready", "started", "processed", "completed")
        for progress in (epochs, batches):
            for part in ("current", "total"):
                if not all(isinstance(progress[part].get(k), int) for k in keys):
                    return None
        if not isinstance(loop_state.get("_batches_that_stepped"), int):
            return None
    except (KeyError, TypeError, AttributeError):
        return None
    return epochs, batches, loop_state


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """``module``'s trainer, or None when it is not attached to one (reads ``_trainer``)."""
    return module._trainer
