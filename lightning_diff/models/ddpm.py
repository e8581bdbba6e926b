"""DDPM (Ho, Jain, Abbeel 2020, arXiv 2006.11239) as a LightningModule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.denoisers import VPDenoiser
from lightning_diff.diffusion.objectives import DiscreteObjective
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.models.neural import PreconditionedModule


class DDPM(PreconditionedModule):
    """Discrete-time DDPM: ``t`` uniform over the schedule's ``T`` steps, the network conditioned on ``t``.

    Args:
        net: network called as ``net(input, t)`` with ``t`` the float timestep in ``[0, T - 1]``.
        schedule: a :class:`DiscreteSchedule` (linear or cosine).
        prediction: ``edm`` (Karras et al. 2022 preconditioning, the default), or what the network
            predicts in DDPM's own coordinates: ``eps``, ``x0`` or ``v``
            (see :mod:`lightning_diff.diffusion.objectives`).
        loss_weighting: ``simple`` (unit weight on the network's target) or ``min_snr``;
            ``min_snr_gamma`` is the cap (5 in the paper).
        sigma_data, center: the ``edm`` preconditioning's data scale and offset
            (see :class:`~lightning_diff.models.neural.PreconditionedModule`).
        The rest (optimizer, EMA, sampler, compile, channels_last) as in :class:`DiffusionModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: DiscreteSchedule | None = None,
        prediction: str = "edm",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
        sigma_data: float | None = None,
        center: bool = True,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        sampler: Sampler | None = None,
        clip_denoised: bool = False,
        compile: bool | str = False,
        channels_last: bool = False,
    ):
        super().__init__(
            net,
            prediction,
            sigma_data,
            center,
            optimizer=optimizer,
            lr_warmup_steps=lr_warmup_steps,
            ema_decay=ema_decay,
            ema_warmup=ema_warmup,
            sampler=sampler,
            clip_denoised=clip_denoised,
            compile=compile,
            channels_last=channels_last,
        )
        self.schedule = schedule or DiscreteSchedule()
        self.objective = DiscreteObjective(self.schedule, loss_weighting, min_snr_gamma)
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma

    def adapter(self, net: nn.Module, sigma_data: float, mean: Tensor | None) -> VPDenoiser:
        return VPDenoiser(net, self.schedule, self.prediction, sigma_data, mean)
