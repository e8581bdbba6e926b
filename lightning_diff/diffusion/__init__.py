"""The mathematics of diffusion models in plain torch: schedules, SDEs, denoisers, objectives, samplers.

Nothing in this package imports Lightning, so every piece can be unit-tested alone and reused by
any model family. All families meet at one interface (``Denoiser``): given ``x = x0 + sigma * n``
and ``sigma``, return an estimate of ``E[x0 | x]``.
"""

from lightning_diff.diffusion.denoisers import Denoiser, GaussianDenoiser, SDEDenoiser, VPDenoiser
from lightning_diff.diffusion.log_likelihood import bits_per_dim, dequantize, ode_log_likelihood
from lightning_diff.diffusion.ode import sample_heun, sample_ode_adaptive, solve_dopri5
from lightning_diff.diffusion.random import CounterNoise, SampleGenerators, randn
from lightning_diff.diffusion.samplers import Sampler, sample_ancestral, sample_ddim
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.diffusion.sde_samplers import sample_euler_maruyama, sample_exponential, sample_pc
from lightning_diff.diffusion.sdes import SDE, VESDE, VPSDE, ReverseSDE, SubVPSDE
from lightning_diff.diffusion.utils import append_dims

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "CounterNoise",
    "Denoiser",
    "DiscreteSchedule",
    "GaussianDenoiser",
    "ReverseSDE",
    "SDEDenoiser",
    "SampleGenerators",
    "Sampler",
    "SubVPSDE",
    "VPDenoiser",
    "append_dims",
    "bits_per_dim",
    "dequantize",
    "ode_log_likelihood",
    "randn",
    "sample_ancestral",
    "sample_ddim",
    "sample_euler_maruyama",
    "sample_exponential",
    "sample_heun",
    "sample_ode_adaptive",
    "sample_pc",
    "solve_dopri5",
]
