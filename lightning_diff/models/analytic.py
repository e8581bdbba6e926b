"""Analytic families: closed-form scores fitted to the training set, with nothing to train.

They are the references of Wang & Vastola 2024 (arXiv 2412.09726) as models in their own right, so
they sample, evaluate and checkpoint like every family: ``model=gaussian`` (the data's mean and
covariance), ``model=gmm`` (a k-means Gaussian mixture) and ``model=empirical`` (the training set's
delta mixture, which memorizes). ``train()`` calls :meth:`AnalyticModel.fit_data` with the training
set before ``trainer.fit``; the fitted tensors are buffers, so checkpoints carry them.

Sampling grids come from a variance-preserving DDPM :class:`DiscreteSchedule` (the same grids and
prior as ``model=ddpm``, so samplers and step counts compare one to one); the denoisers themselves
are exact in the ``x = x0 + sigma n`` coordinates and do not depend on the schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.closed_form import EmpiricalDenoiser, GaussianMixtureDenoiser, data_moments
from lightning_diff.diffusion.denoisers import Denoiser, GaussianDenoiser
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.errors import ConfigError
from lightning_diff.models.diffusion_module import DiffusionModule

KINDS = ("gaussian", "gmm", "empirical")
BUFFERS = {
    "gaussian": ("fit_mean", "fit_cov"),
    "gmm": ("fit_means", "fit_covs", "fit_weights"),
    "empirical": ("fit_points",),
}


class _Placeholder(nn.Module):
    """One zero parameter, so that the optimiser, the EMA and ``trainer.fit`` run as for any family."""

    def __init__(self):
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(()))


class AnalyticModel(DiffusionModule):
    """A closed-form denoiser fitted to the training set.

    Args:
        kind: ``gaussian``, ``gmm`` or ``empirical``.
        net: accepted for the common signature (``train()`` always builds one) and unused.
        schedule: the :class:`DiscreteSchedule` giving sampling grids (DDPM's linear one by default).
        num_components, fit_seed, fit_iters, ridge: the k-means fit of ``gmm``
            (see :meth:`GaussianMixtureDenoiser.fit`).
        chunk_size: training points per chunk of ``empirical``'s softmax.
        The rest as in :class:`DiffusionModule`; the loss is identically zero.
    """

    def __init__(
        self,
        kind: str = "gaussian",
        net: nn.Module | None = None,
        schedule: DiscreteSchedule | None = None,
        num_components: int = 8,
        fit_seed: int = 0,
        fit_iters: int = 50,
        ridge: float = 1e-4,
        chunk_size: int = 4096,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.0,
        ema_warmup: bool = False,
        sampler: Sampler | None = None,
        clip_denoised: bool = False,
    ):
        if kind not in KINDS:
            raise ConfigError(f"model.kind={kind!r} is not one of {', '.join(KINDS)}")
        super().__init__(
            _Placeholder(), optimizer, lr_warmup_steps, ema_decay, ema_warmup, sampler, clip_denoised
        )
        self.kind = kind
        self.schedule = schedule or DiscreteSchedule()
        self.num_components, self.fit_seed, self.fit_iters = num_components, fit_seed, fit_iters
        self.ridge, self.chunk_size = ridge, chunk_size
        for name in BUFFERS[kind]:
            self.register_data_buffer(name)

    def fit_data(self, train: Tensor, gaussian_reference: bool = True) -> None:
        """Fit the closed-form model to the training set (any per-sample shape)."""
        super().fit_data(train, gaussian_reference)
        train = train.to(self.device)
        if self.kind == "gaussian":
            self.fit_mean, self.fit_cov = data_moments(train)
        elif self.kind == "gmm":
            gmm = GaussianMixtureDenoiser.fit(
                train, self.num_components, self.fit_seed, self.fit_iters, self.ridge
            )
            self.fit_means, self.fit_covs = gmm.means, gmm.eigvecs @ (gmm.eigvals[..., None] * gmm.eigvecs.mT)
            self.fit_weights = gmm.log_weights.exp()
        else:
            self.fit_points = train.reshape(train.shape[0], -1).to(torch.float64)
        self.data_changed()

    def make_denoiser(self, net: nn.Module) -> Denoiser:
        if getattr(self, BUFFERS[self.kind][0]).numel() == 0:
            raise ConfigError(f"model={self.kind} has not been fitted: train it with ld-train first")
        if self.kind == "gaussian":
            return GaussianDenoiser(self.fit_mean, self.fit_cov)
        if self.kind == "gmm":
            return GaussianMixtureDenoiser(self.fit_means, self.fit_covs, self.fit_weights)
        return EmpiricalDenoiser(self.fit_points, self.chunk_size)

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Zero for every sample, attached to the placeholder parameter so the optimiser has a graph."""
        return torch.zeros(batch.shape[0], device=batch.device, dtype=batch.dtype) + 0 * self.net.zero
