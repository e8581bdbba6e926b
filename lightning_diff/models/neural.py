"""What the neural families (DDPM, score SDEs) share: a network preconditioned into a denoiser.

The maths (coefficients, targets, weightings, noise levels) is in
:mod:`lightning_diff.diffusion.objectives`; a family here chooses its objective and its denoiser
adapter, and this class keeps the data statistics that ``edm`` preconditioning needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.denoisers import PreconditionedDenoiser
from lightning_diff.diffusion.objectives import check_prediction, data_statistics
from lightning_diff.errors import ConfigError
from lightning_diff.models.diffusion_module import DiffusionModule
from lightning_diff.nets.precision import PrecisionField


class PreconditionedModule(DiffusionModule):
    """A family whose denoiser is a network through a preconditioning (see ``diffusion/objectives.py``).

    Args:
        net: the network ``F(input, c_noise)``.
        prediction: ``edm`` (default), ``eps``, ``x0`` or ``v``.
        sigma_data: the data scale of ``edm``; None fits it to the training set (``fit_data``, which
            ``ld-train`` calls before training), as the root mean square of the centred data.
        center: with ``edm``, precondition around the training mean (fitted by ``fit_data``) rather
            than around 0, so data far from the origin need no larger network inputs.
        **kwargs: the :class:`DiffusionModule` arguments.

    The fitted mean and scale are buffers, so checkpoints carry them. Subclasses set ``objective``
    (called as ``objective(denoiser, x0, generator)``) and implement :meth:`adapter`.
    """

    objective: Any

    def __init__(
        self,
        net: nn.Module,
        prediction: str = "edm",
        sigma_data: float | None = None,
        center: bool = True,
        **kwargs: Any,
    ):
        if isinstance(net, PrecisionField):
            raise ConfigError(
                "net=precision_field is the kernel model's net; use net=auto|mlp|unet or model=kernel_wpo"
            )
        super().__init__(net, **kwargs)
        self.prediction = check_prediction(prediction)
        if sigma_data is not None and not sigma_data > 0:
            raise ConfigError(f"model.sigma_data={sigma_data} must be positive (or null: fitted to the data)")
        self.sigma_data = sigma_data
        self.center = bool(center)
        self.register_data_buffer("data_mean")
        self.register_data_buffer("data_scale")

    def adapter(self, net: nn.Module, sigma_data: float, mean: Tensor | None) -> PreconditionedDenoiser:
        """The family's denoiser class around ``net`` with these preconditioning statistics."""
        raise NotImplementedError

    def fit_data(self, train: Tensor, gaussian_reference: bool = True) -> None:
        """Fit the training mean and scale that ``edm`` preconditioning uses (kept for every
        parameterisation, so a checkpoint records them)."""
        super().fit_data(train, gaussian_reference)
        mean, scale = data_statistics(train.to(self.device))
        self.data_mean = mean
        self.data_scale = torch.tensor([scale], dtype=torch.float64, device=self.device)
        self.data_changed()

    def preconditioning_statistics(self) -> tuple[float, Tensor | None]:
        """``(sigma_data, mean)`` for the denoiser: the configured or fitted scale, the fitted mean."""
        if self.prediction != "edm":
            return 1.0, None
        fitted = self.data_scale.numel() > 0
        if self.sigma_data is None and not fitted:
            raise ConfigError(
                "model.prediction=edm needs the data's scale: set model.sigma_data, or call "
                "model.fit_data(training data) before training (ld-train does)"
            )
        scale = float(self.sigma_data) if self.sigma_data is not None else float(self.data_scale[0])
        mean = self.data_mean if self.center and fitted else None
        return scale, mean

    def make_denoiser(self, net: nn.Module) -> PreconditionedDenoiser:
        return self.adapter(net, *self.preconditioning_statistics())

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample loss of the family's objective (the network as the training step calls it)."""
        return self.objective(self.make_denoiser(self.training_net), batch, generator)
