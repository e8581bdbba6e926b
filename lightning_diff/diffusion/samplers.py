"""Samplers with one signature: ``fn(denoiser, x, sigmas, generator=None, callback=None, **options)``.

``x`` is the initial noise already scaled to ``sigmas[0]``; ``sigmas`` descends to a final 0.
Each sampler returns ``(samples, num_model_evaluations)``. All work in the variance-exploding
coordinates of the denoiser interface (``x = x0 + sigma n``), where DDPM's and DDIM's updates take
a form that does not depend on the family; the equivalence with the variance-preserving form is
shown in each docstring and checked against diffusers' schedulers in the tests.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_diff.diffusion.compiled import CompiledDenoiser, compile_mode
from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.random import SampleGenerators, randn
from lightning_diff.errors import ConfigError

StepCallback = Callable[[dict[str, Any]], None]


@runtime_checkable
class Schedule(Protocol):
    """What a sampler needs of a family's noise process: DDPM's ``DiscreteSchedule`` and the score
    SDEs (``VPSDE``, ``SubVPSDE``, ``VESDE``) provide it."""

    def sampling_sigmas(self, num_steps: int, spacing: str) -> Tensor:
        """The decreasing noise levels of a ``num_steps``-step grid, ending at 0."""
        ...

    def prior_std(self, sigma: Tensor | float) -> Tensor | float:
        """The standard deviation of the prior ``x`` at noise level ``sigma`` (the grid's first)."""
        ...


Generator = torch.Generator | SampleGenerators | None


def denoise_step(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, i: int, callback: StepCallback | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Step ``i`` of a grid: evaluate ``D(x, sigmas[i])`` and report it to the per-step callback.

    Returns ``(sigma, sigma_next, denoised)``; every sampler's loop starts here.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    denoised = denoiser(x, sigma.to(x.dtype).expand(x.shape[0]))
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
    return sigma, sigma_next, denoised


def _ddim_noise_levels(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split the step to ``sigma_next`` into a deterministic part and fresh noise.

    DDIM (Song, Meng, Ermon 2021, eq. 12 and 16) adds noise of variance
    ``eta^2 (1 - ab') / (1 - ab) (1 - ab / ab')`` in z-space. With ``ab = 1 / (1 + sigma^2)`` and
    dividing by ``ab'`` this is ``sigma_up^2 = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2`` in
    x-space, and the deterministic part keeps ``sigma_down^2 = sigma'^2 - sigma_up^2``.
    """
    sigma_up = math.sqrt(max(eta**2 * sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    sigma_up = min(sigma_up, sigma_next)
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> tuple[Tensor, int]:
    """DDIM (Song, Meng, Ermon 2021, arXiv 2010.02502, Algorithm in eq. 12).

    In x-space a step reads ``x' = D + sigma_down * eps_hat + sigma_up * n`` with
    ``eps_hat = (x - D) / sigma``. At ``eta = 0`` this is Euler's method on the probability-flow ODE
    ``dx/dsigma = (x - D) / sigma`` (Karras et al. 2022, Sec. 3); at ``eta = 1`` it is ancestral
    sampling with the posterior variance.
    """
    # The grid is read on the host once (no wait when it is given on the CPU): the loop's branches
    # and step sizes never wait for the device.
    levels = sigmas.tolist()
    sigmas = sigmas.to(device=x.device, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        _, _, denoised = denoise_step(denoiser, x, sigmas, i, callback)
        sigma, sigma_next = levels[i], levels[i + 1]
        if sigma_next == 0:
            x = denoised
            continue
        sigma_down, sigma_up = _ddim_noise_levels(sigma, sigma_next, eta)
        eps = (x - denoised) / sigma
        x = denoised + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x, len(sigmas) - 1


@torch.no_grad()
def sample_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    callback: StepCallback | None = None,
    variance: str = "posterior",
) -> tuple[Tensor, int]:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), for any subset of the noise levels.

    The reverse step's mean is the posterior mean ``D + (sigma'^2 / sigma) eps_hat``, i.e.
    ``(z - beta / sqrt(1 - ab) eps) / sqrt(alpha)`` rescaled to x-space. Its variance is either the
    posterior variance ``beta_tilde`` (``variance="posterior"``: ``sigma'^2 (sigma^2 - sigma'^2) / sigma^2``
    in x-space) or ``beta`` (``variance="beta"``: ``(sigma^2 - sigma'^2)(1 + sigma'^2) / (1 + sigma^2)``
    in x-space, which assumes the variance-preserving relation ``ab = 1 / (1 + sigma^2)``); the last
    step adds no noise in both cases, as in the paper.
    """
    if variance not in ("posterior", "beta"):
        raise ConfigError(f"unknown ancestral variance {variance!r}: use posterior or beta")
    levels = sigmas.tolist()  # on the host, as in sample_ddim
    sigmas = sigmas.to(device=x.device, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        _, _, denoised = denoise_step(denoiser, x, sigmas, i, callback)
        sigma, sigma_next = levels[i], levels[i + 1]
        if sigma_next == 0:
            x = denoised
            continue
        mean = denoised + (sigma_next**2 / sigma**2) * (x - denoised)
        if variance == "posterior":
            var = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
        else:
            var = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
        noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x = mean + math.sqrt(var) * noise
    return x, len(sigmas) - 1


class Sampler:
    """A sampling algorithm with its step count and timestep spacing, as built from ``conf/sampler``.

    Args:
        fn: a sampler function (Hydra builds it with ``_partial_: true`` so options such as ``eta``
            are bound).
        num_steps: number of denoiser evaluations' worth of steps.
        spacing: how the steps are placed on a discrete schedule (see ``DiscreteSchedule.timesteps``).
        compile: call the denoiser of every step through ``torch.compile``: ``false``, ``true`` or a
            mode (``reduce-overhead`` captures the network call in a CUDA graph); see
            :mod:`lightning_diff.diffusion.compiled`. The update and the noise stay eager, so a
            compiled run draws the same noise as an eager one.
    """

    #: Whether the sampler starts from the data's Gaussian (``reference``); see :meth:`__call__`.
    needs_reference = False

    def __init__(
        self,
        fn: Callable[..., tuple[Tensor, int]],
        num_steps: int = 50,
        spacing: str = "leading",
        compile: bool | str = False,
    ):
        self.fn = fn
        self.num_steps = int(num_steps)
        self.spacing = spacing
        self.compile = compile_mode(compile, "sampler.compile")
        # One compiled wrapper per denoiser (weakly held: it goes with the denoiser).
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def prepare(self, denoiser: Denoiser) -> Denoiser:
        """The denoiser the loop calls: ``denoiser`` itself, or its compiled wrapper (built once)."""
        if self.compile is None:
            return denoiser
        wrapper = self._compiled.get(denoiser)
        if wrapper is None:
            wrapper = self._compiled[denoiser] = CompiledDenoiser(denoiser, self.compile)
        return wrapper

    def __call__(
        self,
        denoiser: Denoiser,
        schedule: Schedule,
        shape: tuple[int, ...],
        generator: Generator = None,
        device: torch.device | str = "cpu",
        callback: StepCallback | None = None,
        reference: Denoiser | None = None,
    ) -> tuple[Tensor, int]:
        """Draw prior noise for ``shape`` and integrate it to data; ``schedule`` supplies the grid.

        Every sampler takes the same context: ``reference`` is the data's Gaussian as a denoiser
        (the model's ``gaussian_reference``), passed to samplers whose ``needs_reference`` is true
        (teleportation) and ignored by the others.
        """
        sigmas = schedule.sampling_sigmas(self.num_steps, self.spacing).to(device)
        x = randn(shape, generator, device=device) * float(schedule.prior_std(sigmas[0]))
        return self.fn(self.prepare(denoiser), x, sigmas, generator=generator, callback=callback)

    def with_num_steps(self, num_steps: int) -> Sampler:
        """The same algorithm, spacing and compilation with another step count."""
        return Sampler(self.fn, num_steps=num_steps, spacing=self.spacing, compile=self.compile or False)

    def with_compile(self, compile: bool | str) -> Sampler:
        """A copy whose denoiser calls go through ``torch.compile`` in ``compile``'s mode (false: eager)."""
        other = copy.copy(self)
        other.compile = compile_mode(compile, "compile")
        other._compiled = weakref.WeakKeyDictionary()
        return other

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None  # compiled functions do not pickle; rebuilt on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.compile = state.get("compile")
        self._compiled = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        name = getattr(self.fn, "func", self.fn).__name__
        return f"Sampler({name}, num_steps={self.num_steps}, spacing={self.spacing!r})"
