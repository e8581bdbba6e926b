"""DDPM (Ho, Jain, Abbeel 2020, arXiv 2006.11239) as a LightningModule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.denoisers import PREDICTIONS, VPDenoiser
from lightning_diff.diffusion.random import randint, randn
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.diffusion.utils import append_dims
from lightning_diff.errors import ConfigError
from lightning_diff.models.base import DiffusionModule

WEIGHTINGS = ("simple", "min_snr")


def snr_weight(snr: Tensor, prediction: str, weighting: str, gamma: float) -> Tensor:
    """Per-sample loss weight.

    ``simple`` is the unweighted loss of Ho et al. 2020 (eq. 14) in the chosen parameterisation.
    ``min_snr`` (Hang et al. 2023, arXiv 2303.09556, eq. 9 and Sec. 3.4) caps the signal-to-noise
    ratio at ``gamma``; since eps-, x0- and v-losses equal the x0-loss times ``SNR``, ``1`` and
    ``SNR + 1``, the weight that makes the effective x0-weight ``min(SNR, gamma)`` is
    ``min(SNR, gamma) / SNR``, ``min(SNR, gamma)`` and ``min(SNR, gamma) / (SNR + 1)``.
    """
    if weighting == "simple":
        return torch.ones_like(snr)
    capped = snr.clamp(max=gamma)
    return {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1)}[prediction]


class DDPM(DiffusionModule):
    """Discrete-time DDPM with eps / x0 / v prediction and simple or min-SNR weighting.

    Args:
        net: network called as ``net(z_t, t)`` with ``t`` the float timestep in ``[0, T - 1]``.
        schedule: a :class:`DiscreteSchedule` (linear or cosine).
        prediction: what the network predicts: ``eps``, ``x0`` or ``v``.
        loss_weighting: ``simple`` or ``min_snr``; ``min_snr_gamma`` is the cap (5 in the paper).
        The rest (optimizer, EMA, sampler, compile, channels_last) as in :class:`DiffusionModule`.
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: DiscreteSchedule | None = None,
        prediction: str = "eps",
        loss_weighting: str = "simple",
        min_snr_gamma: float = 5.0,
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
        if prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if loss_weighting not in WEIGHTINGS:
            raise ConfigError(
                f"model.loss_weighting={loss_weighting!r} is not one of {', '.join(WEIGHTINGS)}"
            )
        self.schedule = schedule or DiscreteSchedule()
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma

    def make_denoiser(self, net: nn.Module) -> VPDenoiser:
        return VPDenoiser(net, self.schedule, self.prediction)

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Ho et al. 2020, Algorithm 1: t uniform over the T steps, z_t from the forward marginal."""
        x0 = batch
        t = randint(self.schedule.num_timesteps, (x0.shape[0],), generator, device=x0.device)
        noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        ab = self.schedule.alphas_cumprod[t]
        sqrt_ab = append_dims(ab.sqrt().to(x0.dtype), x0.ndim)
        sqrt_1mab = append_dims((1 - ab).sqrt().to(x0.dtype), x0.ndim)
        z = sqrt_ab * x0 + sqrt_1mab * noise
        out = self.training_net(z, t.to(x0.dtype))
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x0
        else:
            target = sqrt_ab * noise - sqrt_1mab * x0
        mse = (out - target).pow(2).flatten(1).mean(1)
        weight = snr_weight(ab / (1 - ab), self.prediction, self.loss_weighting, self.min_snr_gamma)
        return weight.to(mse.dtype) * mse
