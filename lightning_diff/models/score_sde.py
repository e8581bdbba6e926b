"""Continuous-time score SDEs (Song et al. 2021, arXiv 2011.13456) as a LightningModule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.denoisers import SDEDenoiser
from lightning_diff.diffusion.objectives import ContinuousObjective
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.diffusion.sdes import SDE, VPSDE
from lightning_diff.models.neural import PreconditionedModule


class ScoreSDE(PreconditionedModule):
    """A VP, sub-VP or VE score SDE trained by denoising score matching, ``t ~ U(train_eps, T)``.

    The SDE is also the model's ``schedule`` (it provides ``sampling_sigmas`` and ``prior_std``), so
    every sampler of the package runs on it, the reverse-SDE samplers as well as DDIM and ancestral
    sampling.

    Args:
        net: network called as ``net(input, 999 t)``.
        sde: the forward SDE (:class:`~lightning_diff.diffusion.sdes.VPSDE` by default).
        prediction: ``edm`` (Karras et al. 2022 preconditioning, the default), ``eps`` (the paper's:
            the noise of ``z_t = alpha_t x0 + std_t n``), ``x0`` or ``v``.
        weighting: ``simple`` (unit weight on the network's target; with ``eps`` this is the paper's
            ``lambda(t) = std_t^2``), ``std2`` (that ``lambda`` in any parameterisation),
            ``likelihood`` (``lambda(t) = g(t)^2``, Song, Durkan, Murray & Ermon 2021, Thm. 1) or
            ``min_snr`` (cap ``min_snr_gamma``); see :mod:`lightning_diff.diffusion.objectives`.
        sigma_data, center: the ``edm`` preconditioning's data scale and offset
            (see :class:`~lightning_diff.models.neural.PreconditionedModule`).
        The rest (optimizer, EMA, sampler, clip_denoised, compile, channels_last) as in
            :class:`DiffusionModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE | None = None,
        prediction: str = "edm",
        weighting: str = "simple",
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
        self.sde = sde or VPSDE()
        self.schedule = self.sde
        self.objective = ContinuousObjective(self.sde, weighting, min_snr_gamma)
        self.weighting = weighting

    def adapter(self, net: nn.Module, sigma_data: float, mean: Tensor | None) -> SDEDenoiser:
        return SDEDenoiser(net, self.sde, self.prediction, sigma_data, mean)
