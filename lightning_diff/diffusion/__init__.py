"""The mathematics of diffusion models in plain torch: schedules, denoisers, objectives, samplers.

Nothing in this package imports Lightning, so every piece can be unit-tested alone and reused by
any model family. All families meet at one interface (``Denoiser``): given ``x = x0 + sigma * n``
and ``sigma``, return an estimate of ``E[x0 | x]``.
"""

from lightning_diff.diffusion.denoisers import Denoiser, GaussianDenoiser, VPDenoiser
from lightning_diff.diffusion.random import SampleGenerators, randn
from lightning_diff.diffusion.samplers import SAMPLERS, Sampler, sample_ancestral, sample_ddim
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.diffusion.utils import append_dims

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "DiscreteSchedule",
    "GaussianDenoiser",
    "SampleGenerators",
    "Sampler",
    "VPDenoiser",
    "append_dims",
    "randn",
    "sample_ancestral",
    "sample_ddim",
]
