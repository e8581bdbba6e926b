"""Exact sampling of models whose data-time distribution is a Gaussian mixture in closed form.

The kernel WPO model at ``sigma = 0`` is ``(1/M) sum_i N(y_i, C_i)``; ``model=gaussian``, ``gmm`` and
``empirical`` are mixtures too (one component, K components, M deltas). Such a model is sampled
without any ODE or SDE: pick a component by its weight, draw from its Gaussian. No discretisation
error, no denoiser evaluation, and a cost per sample that does not grow with a number of steps.

Each of these denoisers has ``sample_exact(shape, generator, device)``; :class:`ExactSampler` is the
sampler (``sampler=exact``) that calls it. All randomness of sample ``j`` comes from one row of
standard normals drawn through :func:`~lightning_diff.diffusion.random.randn` (the component from
the normal CDF of its first entry), so with per-sample generators the samples do not depend on the
batch layout, as with every other sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import ClampedDenoiser, Denoiser
from lightning_diff.diffusion.samplers import Generator, Sampler, StepCallback
from lightning_diff.errors import ConfigError


class ExactSampler(Sampler):
    """``sampler=exact``: draws from the model's own closed-form mixture (see the module docstring).

    Reports 0 model evaluations per sample. With ``model.clip_denoised`` the samples are clamped to
    the data range, as every other sampler's final denoised value is.
    """

    def __init__(self, num_steps: int = 0) -> None:
        # num_steps is accepted (configs and ld-sample set it for every sampler) and means nothing here.
        super().__init__(fn=None, num_steps=0, spacing="none")

    def __call__(
        self,
        denoiser: Denoiser,
        schedule,
        shape: tuple[int, ...],
        generator: Generator = None,
        device: torch.device | str = "cpu",
        callback: StepCallback | None = None,
        reference: Denoiser | None = None,
    ) -> tuple[Tensor, int]:
        inner = denoiser.inner if isinstance(denoiser, ClampedDenoiser) else denoiser
        draw = getattr(inner, "sample_exact", None)
        if draw is None:
            raise ConfigError(
                f"sampler=exact needs a model whose distribution is a closed-form mixture (model=kernel_wpo, "
                f"gaussian, gmm or empirical), not {type(inner).__name__}: use sampler=heun or sampler=ddim"
            )
        x = draw(shape, generator, device).to(torch.float32)
        if isinstance(denoiser, ClampedDenoiser):
            x = x.clamp(denoiser.low, denoiser.high)
        return x, 0

    def with_num_steps(self, num_steps: int) -> ExactSampler:
        """The same sampler: it has no steps."""
        return self

    def __repr__(self) -> str:
        return "ExactSampler()"
