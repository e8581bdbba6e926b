"""Save a checkpoint and stop cleanly when the process is asked to stop (SIGTERM, SIGUSR1)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_diff.lightning_internals import cluster_environment, slurm_requeue

log = logging.getLogger("lightning_diff.preemption")


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1, write ``dirpath/last.ckpt`` at the end of the current step and stop.

    The handlers only set a flag; the checkpoint is written from ``on_train_batch_end``, after the
    optimiser step and the EMA update, through ``trainer.save_checkpoint`` on every rank. With
    several processes the flags are combined every step (one small all-reduce), so every rank
    stops after the same step even if the signal reached them at different times.

    Under SLURM with auto-requeue, the requeue signal (SIGUSR1) is Lightning's: it writes
    ``hpc_ckpt_<n>.ckpt`` and requeues the job, and training goes on until SLURM stops it (with a
    SIGTERM, handled as above). Lightning would write that checkpoint from the signal handler,
    wherever in a step the signal lands (half an optimiser step, or a batch already taken from the
    loader but not trained on); here the handler only sets the flag too and Lightning's save and
    requeue run at the end of the step, so the file resumes exactly like the others.

    After ``fit`` returns, :attr:`stopped_by` names the signal (or is None) and :attr:`path` the file.
    """

    def __init__(self, dirpath: str | Path, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1")):
        self.dirpath = Path(dirpath)
        self.signal_names = [str(s) for s in signals]
        self.stopped_by: str | None = None
        self.path: Path | None = None
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._requeue_signal: int | None = None  # SLURM's, when Lightning requeues on it
        self.requeued = False

    def _handler(self, signum: int, frame) -> None:
        self._received = signum
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before Lightning's own SIGTERM handler, which then calls this one as well.
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        env = cluster_environment(trainer)
        self._requeue_signal = None
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            self._requeue_signal = int(env.requeue_signal)
        names = {getattr(signal, n) for n in self.signal_names if hasattr(signal, n)}
        if self._requeue_signal is not None:
            names.add(self._requeue_signal)  # taken before Lightning's handler, which then stays out
        for signum in sorted(names):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def restore_handlers(self) -> None:
        """Put back the handlers found at set-up (also after an exception ended ``fit``)."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore_handlers()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # A SIGTERM that lands between two steps (while a checkpoint or the logs are written, or
        # during validation) makes Lightning stop before the next step starts, without another
        # on_train_batch_end: save the last finished step here, before Lightning tears down.
        if isinstance(exception, SIGTERMException) and self._received and self.stopped_by is None:
            self._save(trainer, self._received)
        self.restore_handlers()

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        received = self._received or 0
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([received], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag.item())
        return received

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        if not signum or self.stopped_by is not None:
            return
        if signum == self._requeue_signal:
            # Once per run: the same signal reaching a rank a step later is not a second requeue.
            # A SIGTERM afterwards still stops and saves as usual.
            self._received = None
            if not self.requeued:
                self.requeued = True
                slurm_requeue(trainer, signum)
                if trainer.is_global_zero:
                    log.info(
                        "%s: requeued under SLURM at step %d",
                        signal.Signals(signum).name,
                        trainer.global_step,
                    )
            return
        self._save(trainer, signum)

    def _save(self, trainer: L.Trainer, signum: int) -> None:
        self.path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(self.path)
        self.stopped_by = signal.Signals(signum).name
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.info("%s received: saved %s at step %d", self.stopped_by, self.path, trainer.global_step)
