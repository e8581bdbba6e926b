"""What every model family shares: the network and its EMA, the optimiser, sampling, checkpoint metadata.

A family subclasses :class:`DiffusionModule` and provides ``make_denoiser(net)`` (its adapter to the
denoiser interface), ``schedule`` (an object with ``sampling_sigmas`` and ``prior_std``),
``loss(batch, generator)`` and, if it needs the training set before training, ``fit_data(train)``.
Everything downstream (samplers, callbacks, metrics, the CLI) talks to ``denoiser`` and ``sample``
only.

The training loss's deferred NaN check and the decision to log it at logging steps are a
:class:`~lightning_diff.models.loss_monitor.LossMonitor` that the hooks here feed; the EMA is
:mod:`lightning_diff.models.ema`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_diff.diffusion.closed_form import data_moments
from lightning_diff.diffusion.compiled import compile_mode, compile_module
from lightning_diff.diffusion.denoisers import ClampedDenoiser, Denoiser, GaussianDenoiser
from lightning_diff.diffusion.random import SampleGenerators, ShardedGenerator
from lightning_diff.diffusion.samplers import Sampler, Schedule, sample_ddim
from lightning_diff.errors import ConfigError
from lightning_diff.lightning_internals import attached_trainer
from lightning_diff.models.ema import EMAUpdate, ExponentialAverage
from lightning_diff.models.loss_monitor import LossMonitor
from lightning_diff.resume import (
    RNG_KEY,
    align_loop_state,
    gather_rng_states,
    rank_rng_state,
    set_rng_states,
)
from lightning_diff.seeding import step_seed

CHECKPOINT_KEY = "lightning_diff"


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear learning-rate warm-up over ``warmup_steps`` optimiser steps, constant afterwards."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


class ChannelsLastCall(nn.Module):
    """Calls ``net`` with a 4-D image input in ``channels_last`` memory format (other inputs unchanged).

    Used only as the unregistered training-time wrapper of :class:`DiffusionModule`, so it adds no
    keys to any ``state_dict``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x, c_noise)


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: list[nn.Parameter]):
    """``factory(params)``; a ``fused=True`` the parameters' device cannot run falls back to torch's choice.

    Recent torch runs fused AdamW on CUDA and on the CPU; older versions and other devices raise a
    RuntimeError, in which case the optimiser is built again without ``fused`` and a warning says so.
    """
    keywords = getattr(factory, "keywords", None) or {}
    try:
        return factory(params)
    except RuntimeError as err:
        if not keywords.get("fused"):
            raise
        device = params[0].device if params else "cpu"
        rank_zero_warn(f"model.optimizer.fused=true is not supported on {device} here ({err}); not fused")
        return factory(params, fused=None)


class DiffusionModule(L.LightningModule):
    """Base LightningModule of every family.

    Args:
        net: the network (built from ``conf/net`` for the data's shape).
        optimizer: a partial optimiser factory (``_partial_: true`` in config), called with the
            network's parameters.
        lr_warmup_steps: linear warm-up length in optimiser steps.
        ema_decay: decay of the exponential moving average of the weights; 0 disables it (the EMA
            then tracks the raw weights exactly).
        ema_warmup: ramp the EMA decay up over the first updates.
        sampler: the default sampler for grids, evaluation and ``ld-sample``.
        clip_denoised: clamp the denoised estimate to [-1, 1] while sampling (the original DDPM
            sampler's choice for images; the noise estimate then follows from the clamped value).
        compile: call the network through ``torch.compile`` in the training loss: ``false``,
            ``true`` (the default mode) or a mode name (``reduce-overhead``, ``max-autotune``,
            ``max-autotune-no-cudagraphs``; :mod:`lightning_diff.diffusion.compiled`). The compiled
            wrapper is not a registered submodule, so parameter names, ``state_dict`` keys,
            checkpoints and the EMA are the same with and without it; sampling uses the EMA copy,
            which is not compiled.
        channels_last: keep the weights of an image network (and the EMA copy) in ``channels_last``
            memory format and feed it ``channels_last`` inputs while training; no effect on vectors.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        sampler: Sampler | None = None,
        clip_denoised: bool = False,
        compile: bool | str = False,
        channels_last: bool = False,
    ):
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay={ema_decay} must be in [0, 1)")
        self.compile_mode = compile_mode(compile, "model.compile")
        self.compile_net = self.compile_mode is not None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        # The function the training loss calls the net through; built on first use (see training_net).
        self.__dict__["_training_net"] = None
        self.ema = ExponentialAverage(net, EMAUpdate(ema_decay, ema_warmup))
        self.ema.requires_grad_(False)
        self.optimizer_factory = optimizer or torch.optim.AdamW
        self.lr_warmup_steps = lr_warmup_steps
        self.sampler = sampler or Sampler(sample_ddim, num_steps=50)
        self.clip_denoised = clip_denoised
        # Set by the entry point: resolved config, data shape, logger run id; saved in checkpoints.
        self.run_meta: dict[str, Any] = {}
        # The training noise of step k comes from a generator seeded by (noise_seed, k): a resumed
        # run draws the same noise, and so does each slice of a global batch split over processes.
        self.noise_seed = 0
        self._noise_generator: torch.Generator | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        # Training losses not yet checked for NaN/inf, and what on_train_batch_end may log.
        self.loss_monitor = LossMonitor()
        self._denoisers: dict[bool, Denoiser] = {}
        # Buffers whose shape is only known once data are seen; see _load_from_state_dict.
        self._data_buffers: list[str] = []
        self._gaussian: GaussianDenoiser | None = None
        self.register_data_buffer("gaussian_mean")
        self.register_data_buffer("gaussian_cov")

    # ---- what a family provides -------------------------------------------------------------
    schedule: Schedule

    def make_denoiser(self, net: nn.Module) -> Denoiser:
        raise NotImplementedError

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample training loss (B,); ``generator`` makes it deterministic (validation)."""
        raise NotImplementedError

    @property
    def training_net(self) -> nn.Module:
        """The network as the training loss calls it: ``self.net``, or a wrapper of it that converts
        inputs to ``channels_last`` and/or is compiled. The wrapper shares ``self.net``'s parameters
        and lives outside the module tree (not in ``state_dict``, dropped when pickled)."""
        if not (self.compile_net or self.channels_last):
            return self.net
        if self.__dict__.get("_training_net") is None:
            call: nn.Module = ChannelsLastCall(self.net) if self.channels_last else self.net
            mode = getattr(self, "compile_mode", "default" if self.compile_net else None)
            compiled = compile_module(call, mode) if mode else call
            self.__dict__["_training_net"] = compiled
        return self.__dict__["_training_net"]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_training_net"] = None  # a compiled function does not pickle; rebuilt on first use
        return state

    # ---- data fitted before training: the data's Gaussian (the teleportation reference) ---------
    def register_data_buffer(self, name: str) -> None:
        """A checkpointed buffer, empty until data are fitted; loading resizes it to the saved shape."""
        self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self._data_buffers.append(name)

    def data_changed(self) -> None:
        """Forget every object built from the data buffers (after fitting, loading or moving)."""
        self._denoisers.clear()
        self._gaussian = None

    def fit_data(self, train: Tensor, gaussian_reference: bool = True) -> None:
        """Fit what the model takes from the whole training set before training; ``ld-train`` calls it
        once with the training split. Here: the training set's mean and covariance (Wang & Vastola
        2024), the reference of teleportation and of the score-deviation callback, unless
        ``gaussian_reference`` is false (``ld-train gaussian_reference=false``). Families extend it
        (calling this first) with what they fit: preconditioning statistics, closed-form parameters,
        kernel centres.

        The moments are kept in float64 buffers, so checkpoints carry them and ``ld-sample`` can
        teleport; data of ``d`` dimensions add ``8 d^2`` bytes to a checkpoint (75 MB at 3 x 32 x 32).
        """
        if gaussian_reference:
            mean, cov = data_moments(train.to(self.device))
            self.gaussian_mean, self.gaussian_cov = mean, cov
            self.data_changed()

    @property
    def gaussian_reference(self) -> GaussianDenoiser | None:
        """The data's Gaussian as a denoiser, or None when no data were fitted (an older checkpoint)."""
        if self._gaussian is None and self.gaussian_mean.numel():
            # Kept outside the module tree: a submodule would add keys to every later checkpoint.
            self.__dict__["_gaussian"] = GaussianDenoiser(self.gaussian_mean, self.gaussian_cov)
        return self._gaussian

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Data buffers take the saved shape; a checkpoint written before they existed keeps them empty.
        for name in self._data_buffers:
            key = prefix + name
            if key in state_dict:
                saved = state_dict[key]
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype, device=self.device))
            else:
                state_dict[key] = getattr(self, name)
        self.data_changed()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _apply(self, fn, *args, **kwargs):
        self.data_changed()
        return super()._apply(fn, *args, **kwargs)

    # ---- the shared interface ---------------------------------------------------------------
    def denoiser(self, use_ema: bool = True) -> Denoiser:
        """The model as a :class:`Denoiser`; the EMA weights by default."""
        if use_ema not in self._denoisers:
            denoiser = self.make_denoiser(self.ema.module if use_ema else self.net)
            self._denoisers[use_ema] = ClampedDenoiser(denoiser) if self.clip_denoised else denoiser
        return self._denoisers[use_ema]

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        data_shape: tuple[int, ...],
        sampler: Sampler | None = None,
        generator: torch.Generator | SampleGenerators | None = None,
        use_ema: bool = True,
    ) -> tuple[Tensor, int]:
        """Draw ``num_samples`` samples; returns ``(samples, model evaluations per sample)``."""
        sampler = sampler or self.sampler
        denoiser = self.denoiser(use_ema)
        was_training = denoiser.training
        denoiser.eval()
        try:
            shape = (num_samples, *data_shape)
            # The data's Gaussian is built (an eigendecomposition) only for samplers that start from it.
            ref = self.gaussian_reference if getattr(sampler, "needs_reference", False) else None
            return sampler(denoiser, self.schedule, shape, generator, self.device, reference=ref)
        finally:
            denoiser.train(was_training)

    # ---- Lightning hooks --------------------------------------------------------------------
    def training_noise(self, batch_idx: int) -> ShardedGenerator:
        """The generator of this step's training noise: seeded by ``(noise_seed, global_step, micro-batch)``
        and sharded like the batch over the processes."""
        if self._noise_generator is None or self._noise_generator.device != self.device:
            self._noise_generator = torch.Generator(device=self.device)
        trainer = self.trainer
        micro = batch_idx % max(1, int(trainer.accumulate_grad_batches))
        self._noise_generator.manual_seed(step_seed(self.noise_seed, self.global_step, micro))
        return ShardedGenerator(self._noise_generator, trainer.global_rank, trainer.world_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The global generators (dropout, user code) continue from the checkpoint's states, put back
        # as late as possible so that nothing run while restarting draws from them.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.loss(batch, generator=self.training_noise(batch_idx)).mean()
        # Nothing here waits for the device: the loss is checked for NaN/inf (check_finite_loss) and
        # logged (on_train_batch_end) only at the steps where something reads it.
        self.loss_monitor.record(self.global_step, loss.detach(), batch.shape[0])
        return loss

    def check_finite_loss(self) -> None:
        """Raise FloatingPointError naming the first step whose training loss was NaN or infinite
        (see :meth:`LossMonitor.check` for when this runs)."""
        self.loss_monitor.check()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        taken = self.loss_monitor.take(self.trainer, batch_idx)
        if taken is None:
            return
        loss, batch_size, lr = taken
        # Averaged over processes (the loss of the global batch, as one process would log it) and
        # handed over on the CPU, so that the progress bar's per-step reading never waits for a GPU.
        loss = self.trainer.strategy.reduce(loss.clone(), reduce_op="mean").cpu()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if lr is not None:
            self.log("train/lr", lr)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        # Fixed noise per batch index, so val/loss is comparable across steps and runs.
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)
        loss = self.loss(batch, generator=gen).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch.shape[0])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimiser step inside the step itself, so a checkpoint written by a
        # callback at the end of the batch already holds the updated average.
        super().optimizer_step(*args, **kwargs)
        self.ema.update_parameters(self.net)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.optimizer_factory, list(self.net.parameters()))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(self.lr_warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for an optimiser that unscales gradients
        # itself (fused AdamW), even under bf16 autocast, which scales nothing. Such gradients are
        # clipped here: as they are without a loss scaler (bf16), or after the scaler has unscaled
        # them (fp16; its step then passes the optimiser no scale, only the inf check).
        plugin = self.trainer.precision_plugin
        unscales_itself = getattr(optimizer, "_step_supports_amp_scaling", False)
        if not (gradient_clip_val and unscales_itself and isinstance(plugin, MixedPrecision)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        scaler = plugin.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The rate this step uses; logged with the loss at the end of the step (on_train_batch_end).
        self.loss_monitor.record_lr(optimizer.param_groups[0]["lr"])

    def on_validation_epoch_start(self) -> None:
        self.check_finite_loss()

    def on_train_end(self) -> None:
        self.check_finite_loss()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_loss()  # raises before anything is written: the last good checkpoint stays
        checkpoint[CHECKPOINT_KEY] = dict(self.run_meta)
        trainer = attached_trainer(self)
        if trainer is not None:
            checkpoint[RNG_KEY] = gather_rng_states(trainer.world_size)
            # Rows logged so far reach the disk with the checkpoint (the CSV logger buffers them).
            for logger in trainer.loggers:
                logger.save()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY, {})
        self.run_meta = {**meta, **self.run_meta}
        trainer = attached_trainer(self)
        if trainer is not None and trainer.state.fn == "fit":  # before Lightning restores its loops
            align_loop_state(checkpoint)
        states = checkpoint.get(RNG_KEY)
        if states and trainer is not None:
            self._rng_to_restore = rank_rng_state(states, trainer.global_rank, trainer.world_size)
