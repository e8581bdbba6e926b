"""Analytical teleportation (Wang & Vastola 2024, arXiv 2412.09726, Sec. 6).

At high noise a learned score is close to the score of the data's Gaussian, whose probability flow
has a closed form (:func:`~lightning_diff.diffusion.closed_form.gaussian_flow`). Teleportation replaces
the first steps of any sampler by that closed form: draw the starting point at the grid's largest
sigma, jump to the skip level at no model cost, and hand over to the sampler for the rest of the grid.

Where the start is drawn from (``start``):

- ``marginal`` (default): from the Gaussian model's own noisy marginal ``N(mu, Sigma + sigma_max^2 I)``.
  The Gaussian flow maps it exactly onto ``N(mu, Sigma + sigma_skip^2 I)``, so with the Gaussian
  model as the denoiser teleportation leaves the sampled distribution unchanged (tested). At the
  large sigma_max of the usual schedules this differs from the prior by ``O(||Sigma|| / sigma_max^2)``.
- ``prior``: from the schedule's prior ``N(0, prior_std^2 I)``, as the inner sampler would; the flow
  then carries the prior's small mismatch with the data along.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_diff.diffusion.closed_form import gaussian_flow, gaussian_marginal_sample
from lightning_diff.diffusion.denoisers import Denoiser, GaussianDenoiser
from lightning_diff.diffusion.random import randn
from lightning_diff.diffusion.samplers import Generator, Sampler, Schedule, StepCallback
from lightning_diff.errors import ConfigError

STARTS = ("marginal", "prior")


class Teleport(Sampler):
    """Wraps a :class:`Sampler`: its first steps are replaced by the closed-form Gaussian flow.

    Args:
        sampler: the sampler that takes over after the jump (its grid, step count and options).
        num_steps: overrides the inner sampler's step count (the whole grid, skipped steps included).
        skip_fraction: skip the first ``round(skip_fraction * num_steps)`` steps (the paper skips
            15-30%); at least one step is always left to the sampler.
        sigma_skip: skip instead to the first grid level ``<= sigma_skip`` (overrides ``skip_fraction``).
        reference: the data's Gaussian; when None the model supplies its own
            (``DiffusionModule.gaussian_reference``) through ``__call__``'s ``reference``.
        start: ``marginal`` or ``prior``, see the module docstring.

    After each call ``saved_nfe`` holds the model evaluations the skipped steps would have cost: the
    inner sampler is run over the skipped part of the grid on the (cheap) Gaussian model for one
    sample and its count is taken. For fixed-step samplers this is exact (used + saved equals a full
    run); for the adaptive ODE solver it is the count the solver needs on the Gaussian model.
    """

    needs_reference = True  # DiffusionModule.sample passes the data's Gaussian

    def __init__(
        self,
        sampler: Sampler,
        num_steps: int | None = None,
        skip_fraction: float | None = 0.2,
        sigma_skip: float | None = None,
        reference: GaussianDenoiser | None = None,
        start: str = "marginal",
    ):
        if num_steps is not None and int(num_steps) != sampler.num_steps:
            sampler = sampler.with_num_steps(num_steps)
        super().__init__(sampler.fn, sampler.num_steps, sampler.spacing, compile=sampler.compile or False)
        if start not in STARTS:
            raise ConfigError(f"teleport start={start!r} is not one of {', '.join(STARTS)}")
        if sigma_skip is None and (skip_fraction is None or not 0.0 <= skip_fraction < 1.0):
            raise ConfigError(f"teleport skip_fraction={skip_fraction} must be in [0, 1) (or set sigma_skip)")
        self.inner = sampler
        self.skip_fraction = skip_fraction
        self.sigma_skip = sigma_skip
        self.reference = reference
        self.start = start
        self.saved_nfe = 0

    def skip_index(self, sigmas: Tensor) -> int:
        """How many steps of the grid ``sigmas`` (descending, ending at 0) the jump replaces."""
        num_steps = len(sigmas) - 1
        if self.sigma_skip is not None:
            below = (sigmas <= self.sigma_skip).nonzero()
            k = int(below[0]) if len(below) else num_steps
        else:
            k = round(self.skip_fraction * num_steps)
        return max(0, min(k, num_steps - 1))

    def with_num_steps(self, num_steps: int) -> Teleport:
        inner = self.inner.with_compile(self.compile or False)  # a compile= set on this one stays
        return Teleport(inner, num_steps, self.skip_fraction, self.sigma_skip, self.reference, self.start)

    def __call__(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        shape: tuple[int, ...],
        generator: Generator = None,
        device: torch.device | str = "cpu",
        callback: StepCallback | None = None,
        reference: GaussianDenoiser | None = None,
    ) -> tuple[Tensor, int]:
        reference = self.reference if self.reference is not None else reference
        if reference is None:
            raise ConfigError(
                "teleportation needs the data's Gaussian: train the model with ld-train (it stores the "
                "training set's mean and covariance) or pass Teleport(reference=GaussianDenoiser(...))"
            )
        reference = reference.to(device)
        sigmas = schedule.sampling_sigmas(self.num_steps, self.spacing).to(device)
        k = self.skip_index(sigmas)
        noise = randn(shape, generator, device=device)
        if self.start == "marginal":
            x = gaussian_marginal_sample(reference, noise, sigmas[0])
        else:
            x = noise * float(schedule.prior_std(sigmas[0]))
        self.saved_nfe = 0
        if k > 0:
            x = gaussian_flow(reference, x, sigmas[0], sigmas[k])
            probe_gen = torch.Generator(device=device).manual_seed(0)
            probe = gaussian_marginal_sample(reference, randn((1, *shape[1:]), probe_gen, device), sigmas[0])
            _, self.saved_nfe = self.fn(reference, probe, sigmas[: k + 1], generator=probe_gen)
        return self.fn(self.prepare(denoiser), x, sigmas[k:], generator=generator, callback=callback)

    def __repr__(self) -> str:
        skip = (
            f"sigma_skip={self.sigma_skip}" if self.sigma_skip is not None else f"skip={self.skip_fraction}"
        )
        return f"Teleport({self.inner!r}, {skip}, start={self.start!r})"
