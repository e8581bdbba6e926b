"""The exact output distribution of a sampler whose denoiser is affine in ``x``.

With the exact denoiser of Gaussian data (and any error that is affine in ``x``), every sampler here
is an affine map of its Gaussian draws: the initial noise and the noise of each stochastic step.
Its output is then exactly ``N(m, C)`` with ``y = m + B xi`` for the stacked draws ``xi``. Both are
read off the sampler's own code by running it on scripted noise: one row whose draws are all zero
gives ``m``; row ``1 + k`` draws the ``k``-th unit vector of the stacked noise (zero everywhere
else), so its output minus ``m`` is column ``k`` of ``B``, and ``C = B B^T``. Rows never interact
(the samplers and denoisers work row by row), so one batch of ``1 + dim * draws`` rows does it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.samplers import Sampler, Schedule


class _CountingNoise:
    """Zeros of any shape; counts the draws (the first pass, to size the scripted one)."""

    def __init__(self):
        self.draws = 0

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> Tensor:
        self.draws += 1
        return torch.zeros(tuple(shape), device=device, dtype=torch.float64)


class ScriptedNoise:
    """Row 0 draws zeros; row ``1 + m * dim + c`` draws the unit vector ``e_c`` at its ``m``-th draw
    and zeros at every other draw. Every draw is float64, whatever the sampler asks for."""

    def __init__(self, dim: int, draws: int):
        self.dim, self.draws, self.count = int(dim), int(draws), 0
        self.rows = 1 + self.dim * self.draws

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> Tensor:
        shape = tuple(shape)
        if shape[0] != self.rows or int(torch.tensor(shape[1:]).prod()) != self.dim:
            raise ValueError(f"scripted noise for {self.rows} rows of {self.dim} values, asked for {shape}")
        if self.count >= self.draws:
            raise RuntimeError(f"the sampler drew noise more than the {self.draws} times it did when counted")
        out = torch.zeros(self.rows, self.dim, dtype=torch.float64, device=device)
        first = 1 + self.count * self.dim
        out[first + torch.arange(self.dim), torch.arange(self.dim)] = 1.0
        self.count += 1
        return out.reshape(shape)


@torch.no_grad()
def gaussian_output(
    sampler: Sampler, denoiser: Denoiser, schedule: Schedule, dim: int
) -> tuple[Tensor, Tensor, int]:
    """Mean ``(dim,)`` and covariance ``(dim, dim)`` of ``sampler``'s output for an affine
    ``denoiser`` of ``dim``-vectors, in float64, and the number of Gaussian draws the sampler made.

    Exact up to rounding when the denoiser is affine in ``x``; a nonlinear one gives the
    linearisation at the zero-noise trajectory, which this function cannot detect.
    """
    counter = _CountingNoise()
    sampler(denoiser, schedule, (1, dim), generator=counter)
    script = ScriptedNoise(dim, counter.draws)
    out, _ = sampler(denoiser, schedule, (script.rows, dim), generator=script)
    if script.count != counter.draws:
        raise RuntimeError(f"the sampler drew {script.count} times, {counter.draws} when counted")
    out = out.to(torch.float64).reshape(script.rows, dim)
    mean = out[0]
    columns = out[1:] - mean
    return mean, columns.T @ columns, counter.draws
