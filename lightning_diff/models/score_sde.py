"""Continuous-time score SDEs (Song et al. 2021, arXiv 2011.13456) as a LightningModule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.denoisers import SDEDenoiser
from lightning_diff.diffusion.random import rand, randn
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.diffusion.sdes import SDE, VPSDE
from lightning_diff.diffusion.utils import append_dims
from lightning_diff.errors import ConfigError
from lightning_diff.models.base import DiffusionModule

SDE_WEIGHTINGS = ("std2", "likelihood")


class ScoreSDE(DiffusionModule):
    """A VP, sub-VP or VE score SDE trained by denoising score matching.

    The SDE is also the model's ``schedule`` (it provides ``sampling_sigmas`` and ``prior_std``), so
    every sampler of the package runs on it, the reverse-SDE samplers as well as DDIM and ancestral
    sampling.

    Args:
        net: network called as ``net(z_t, 999 t)`` that predicts the noise of ``z_t`` (see
            :class:`~lightning_diff.diffusion.denoisers.SDEDenoiser`).
        sde: the forward SDE (:class:`~lightning_diff.diffusion.sdes.VPSDE` by default).
        weighting: ``std2`` (``lambda(t) = std_t^2``, the paper's default) or ``likelihood``
            (``lambda(t) = g(t)^2``, Song, Durkan, Murray & Ermon 2021, arXiv 2101.09258, Thm. 1).
        The rest (optimizer, EMA, sampler, clip_denoised, compile, channels_last) as in
            :class:`DiffusionModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE | None = None,
        weighting: str = "std2",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        sampler: Sampler | None = None,
        clip_denoised: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__(
            net,
            optimizer,
            lr_warmup_steps,
            ema_decay,
            ema_warmup,
            sampler,
            clip_denoised,
            compile=compile,
            channels_last=channels_last,
        )
        if weighting not in SDE_WEIGHTINGS:
            raise ConfigError(f"model.weighting={weighting!r} is not one of {', '.join(SDE_WEIGHTINGS)}")
        self.sde = sde or VPSDE()
        self.schedule = self.sde
        self.weighting = weighting

    def make_denoiser(self, net: nn.Module) -> SDEDenoiser:
        return SDEDenoiser(net, self.sde)

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Denoising score matching (Song et al. 2021, eq. 7), per sample.

        ``t ~ U(train_eps, 1)``, ``z_t = alpha_t x0 + std_t n`` and the loss is
        ``lambda(t) ||score_theta(z_t, t) + n / std_t||^2`` averaged over dimensions. With the score
        ``-eps_theta / std_t`` this equals ``lambda(t) / std_t^2 ||eps_theta - n||^2``, which is how it
        is computed (no division by a small ``std_t``): the weight is 1 for ``std2``, so the loss is
        the noise-prediction MSE, and ``g(t)^2 / std_t^2`` for ``likelihood``.
        """
        x0 = batch
        u = rand((x0.shape[0],), generator, device=x0.device, dtype=x0.dtype)
        t = self.sde.train_eps + (self.sde.T - self.sde.train_eps) * u.to(torch.float64)
        noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        alpha, std = self.sde.marginal(t)
        z = append_dims(alpha.to(x0.dtype), x0.ndim) * x0 + append_dims(std.to(x0.dtype), x0.ndim) * noise
        eps = self.make_denoiser(self.training_net).eps_z(z, t)
        mse = (eps - noise).pow(2).flatten(1).mean(1)
        if self.weighting == "std2":
            return mse
        weight = self.sde.diffusion(t) ** 2 / std**2
        return weight.to(mse.dtype) * mse
