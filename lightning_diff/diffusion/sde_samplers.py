"""Stochastic samplers of the reverse SDE (Song et al. 2021, arXiv 2011.13456), for any family.

They follow the package's sampler signature (see :mod:`lightning_diff.diffusion.samplers`) and work
in the variance-exploding coordinates of the denoiser interface, ``x = x0 + sigma n``. With the
variance time ``tau = sigma^2`` the forward process is a plain Brownian motion, ``dx = dW_tau``,
so its reverse (Anderson 1982; Song et al. eq. 6 with ``f = 0``, ``g = 1``) reads

    dx = -score(x, sigma) dtau + dW_bar_tau,    score = (D(x, sigma) - x) / sigma^2,

integrated from the largest ``tau`` down. Every forward SDE (VP, sub-VP, VE) and the discrete DDPM
schedule maps onto this one equation by ``x = z / alpha_t`` and a change of time, so the samplers
need nothing from the family but its grid of noise levels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.random import randn
from lightning_diff.diffusion.samplers import Generator, StepCallback, denoise_step
from lightning_diff.diffusion.utils import append_dims
from lightning_diff.errors import ConfigError

LANGEVIN_NORMS = ("batch", "sample")


def _reverse_diffusion_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, generator: Generator
) -> Tensor:
    """One Euler-Maruyama step of ``dx = -score dtau + dW_tau`` from ``sigma`` to ``sigma_next``:
    ``x + (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) n``."""
    dtau = sigma**2 - sigma_next**2
    score = (denoised - x) / sigma.to(x.dtype) ** 2
    noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x + dtau.to(x.dtype) * score + dtau.sqrt().to(x.dtype) * noise


@torch.no_grad()
def sample_euler_maruyama(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    callback: StepCallback | None = None,
) -> tuple[Tensor, int]:
    """Euler-Maruyama on the reverse SDE in the variance time ``tau = sigma^2``.

    Step ``i``: ``x <- x + (s_i^2 - s_{i+1}^2) score(x, s_i) + sqrt(s_i^2 - s_{i+1}^2) n``. This is
    exactly the reverse-diffusion predictor of Song et al. 2021 (Appendix E) in these
    coordinates, and for VE it is also their Euler-Maruyama sampler up to the first-order
    approximation ``g(t)^2 dt ~ sigma_i^2 - sigma_{i+1}^2``. For VP and sub-VP it discretises the
    same reverse process after the exact change of variables ``x = z / alpha_t``, ``tau = sigma(t)^2``.
    The last step, to ``sigma = 0``, returns the denoiser's output without noise (the paper's final
    noise removal). One model evaluation per step.
    """
    sigmas = sigmas.to(device=x.device, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = denoise_step(denoiser, x, sigmas, i, callback)
        if sigma_next == 0:
            x = denoised
            continue
        x = _reverse_diffusion_step(x, denoised, sigma, sigma_next, generator)
    return x, len(sigmas) - 1


@torch.no_grad()
def sample_exponential(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    callback: StepCallback | None = None,
) -> tuple[Tensor, int]:
    """Exponential integrator of the reverse Ornstein-Uhlenbeck (VP) SDE in its own coordinates.

    In ``z = x / sqrt(1 + sigma^2)`` the reverse SDE ``dz = [1/2 beta z + beta score_z] dt' + sqrt(beta) dW``
    is linear but for the score. Holding the score at its value at the step's start and integrating
    the rest exactly over a step with ``r = sqrt((1 + s^2) / (1 + s'^2))`` (the growth of the linear
    part) gives ``z' = r z + 2 (r - 1) score_z + sqrt(r^2 - 1) n`` (Zhang & Chen 2023's exponential
    integrator; the scheme the Girsanov bounds of Chen et al. 2023 analyse). Mapped back to ``x``:

        x' = x + c (D - x) + sqrt(s^2 - s'^2) n,    c = 2 (1 + s^2 - sqrt((1 + s^2)(1 + s'^2))) / s^2,

    Euler-Maruyama's noise with a step coefficient that tends to its ``(s^2 - s'^2) / s^2`` for
    small steps and to 2 (not 1) for one step from a large ``s`` to 0. The last step, to ``sigma = 0``,
    returns the denoiser's output, as every sampler here does. One model evaluation per step.
    """
    levels = sigmas.tolist()  # on the host, as in sample_ddim
    sigmas = sigmas.to(device=x.device, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        _, _, denoised = denoise_step(denoiser, x, sigmas, i, callback)
        sigma, sigma_next = levels[i], levels[i + 1]
        if sigma_next == 0:
            x = denoised
            continue
        grow, grow_next = 1.0 + sigma**2, 1.0 + sigma_next**2
        coeff = 2.0 * (grow - math.sqrt(grow * grow_next)) / sigma**2
        noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x = x + coeff * (denoised - x) + math.sqrt(sigma**2 - sigma_next**2) * noise
    return x, len(sigmas) - 1


def langevin_step(
    denoiser: Denoiser, x: Tensor, sigma: Tensor, snr: float, generator: Generator, norms: str = "batch"
) -> Tensor:
    """One Langevin MCMC step targeting ``p_sigma``: the corrector of Song et al. 2021 (Appendix G).

    ``x <- x + e score + sqrt(2 e) n`` with the step ``e = 2 (snr ||n|| / ||score||)^2`` chosen so
    that the signal-to-noise ratio of the update is ``snr``; norms run over all non-batch dimensions.

    ``norms="batch"`` averages the two norms over the batch before the ratio, as the reference code
    does. ``norms="sample"`` uses each sample's own norms, so a sample does not depend on its
    batch-mates (the seed sharding of :mod:`lightning_diff.diffusion.random`), but it is only safe
    in high dimension, where the norms concentrate: in 2-D a sample near a mode has a tiny score and
    gets an unbounded step (measured on a 2-D Gaussian, 250 steps: covariance off by 9 to 17).

    The paper's extra factor ``alpha_i = 1 - beta_i`` for VP is within 2% of 1 and belongs to the
    z-coordinates; in x-coordinates the rule has no such factor.
    """
    if norms not in LANGEVIN_NORMS:
        raise ConfigError(f"unknown corrector norms {norms!r}: use one of {', '.join(LANGEVIN_NORMS)}")
    score = (denoiser(x, sigma.to(x.dtype).expand(x.shape[0])) - x) / sigma.to(x.dtype) ** 2
    noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
    score_norm = score.flatten(1).norm(dim=1)
    noise_norm = noise.flatten(1).norm(dim=1)
    if norms == "batch":
        score_norm, noise_norm = (
            score_norm.mean().expand_as(score_norm),
            noise_norm.mean().expand_as(noise_norm),
        )
    # Where the score vanishes (an untrained net) the rule gives an infinite step: skip the move there.
    ratio = torch.where(score_norm > 0, noise_norm / score_norm, torch.zeros_like(score_norm))
    step = 2 * (snr * ratio) ** 2
    step = append_dims(step, x.ndim)
    return x + step * score + (2 * step).sqrt() * noise


# The corrector's signal-to-noise ratio when none is given: Song et al. 2021's CIFAR-10 value for
# images (N x C x H x W), and the value measured on 2-D data for vectors (N x D; see sample_pc).
DEFAULT_SNR = {"images": 0.16, "vectors": 0.02}


@torch.no_grad()
def sample_pc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    generator: Generator = None,
    callback: StepCallback | None = None,
    snr: float | None = None,
    num_corrector_steps: int = 1,
    norms: str = "batch",
) -> tuple[Tensor, int]:
    """Predictor-corrector sampling (Song et al. 2021, Sec. 4.2; Algorithms 2 and 3 for VE and VP).

    Each step runs the reverse-diffusion predictor (the step of :func:`sample_euler_maruyama`) from
    ``s_i`` to ``s_{i+1}`` and then ``num_corrector_steps`` Langevin corrector steps
    (:func:`langevin_step`) at the new level ``s_{i+1}``. The last step to ``sigma = 0`` returns the
    denoiser's output without a corrector. Model evaluations: one per predictor step plus one per
    corrector step, i.e. ``N + (N - 1) * num_corrector_steps`` for ``N`` steps ending at 0.

    ``snr=None`` takes :data:`DEFAULT_SNR`: the paper's 0.16 for images, 0.02 for vectors. On vectors
    the corrector's step does not shrink with sigma (the score's norm there is set by the data's
    spread), so at low noise it moves samples by many multiples of the network's error: trained
    briefly on a user's 2-D Gaussian, snr = 0.16 left covariance errors of 0.48 (DDPM) and 2.9 (VE,
    2.6% of the samples far out), 0.04 left 0.05-0.06 and 0.02 left 0.03, the level of 2000 true
    samples (with the exact denoiser 0.16 is fine: 0.01-0.03). In float32 the score
    ``(D - x) / sigma^2`` is rounding noise once ``sigma`` nears 1e-4 (sub-VP's last level is
    1.1e-4), which the corrector then amplifies: sample in float64 there.
    """
    if snr is None:
        snr = DEFAULT_SNR["images" if x.ndim > 2 else "vectors"]
    sigmas = sigmas.to(device=x.device, dtype=torch.float64)
    nfe = 0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = denoise_step(denoiser, x, sigmas, i, callback)
        nfe += 1
        if sigma_next == 0:
            x = denoised
            continue
        x = _reverse_diffusion_step(x, denoised, sigma, sigma_next, generator)
        for _ in range(num_corrector_steps):
            x = langevin_step(denoiser, x, sigma_next, snr, generator, norms)
            nfe += 1
    return x, nfe
