"""Injected randomness for samplers.

A sampler draws every random number through :func:`randn` from the generator it is handed. With a
plain ``torch.Generator`` the noise depends on the batch layout. With :class:`SampleGenerators`,
sample ``i`` owns a generator seeded by ``(seed, i)``, so the set of samples produced does not
depend on the batch size or on how many processes share the work (the seed sharding of Karras et
al. 2022's reference generator, re-derived here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_diff.seeding import sample_seed


@runtime_checkable
class NoiseSource(Protocol):
    """Anything that hands out a sampler's Gaussian draws itself (:class:`SampleGenerators`; the
    scripted noise with which :mod:`lightning_diff.diffusion.propagate` reads off a sampler's
    output distribution)."""

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> Tensor: ...


class SampleGenerators:
    """One ``torch.Generator`` per sample, seeded from ``(seed, index)``, drawn row by row.

    The pair is mixed into one 32-bit word (:func:`lightning_diff.seeding.sample_seed`).
    """

    def __init__(self, indices: Sequence[int], seed: int = 0, device: torch.device | str = "cpu"):
        self.indices = list(indices)
        self.device = torch.device(device)
        self.generators = []
        for i in self.indices:
            g = torch.Generator(device=self.device)
            g.manual_seed(sample_seed(seed, i))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} but {len(self.generators)} per-sample generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=self.device) for g in self.generators]
        return torch.stack(rows).to(device=device or self.device, dtype=dtype or torch.float32)


class ShardedGenerator:
    """A generator shared by ``world_size`` processes that each hold one slice of a global batch.

    Every draw of a batch of ``n`` rows is made for the whole global batch of ``n * world_size``
    rows and this process keeps rows ``[rank * n, (rank + 1) * n)``. Given the same seed, the
    training noise of each sample of a global batch is then the same on one process and on
    several (the training sampler shards its batches in the same contiguous way).
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        self.generator, self.rank, self.world_size = generator, int(rank), int(world_size)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    def draw(self, fn, shape: Sequence[int], **kwargs) -> Tensor:
        n = int(shape[0])
        out = fn((n * self.world_size, *shape[1:]), generator=self.generator, device=self.device, **kwargs)
        return out[self.rank * n : (self.rank + 1) * n] if self.world_size > 1 else out


def randn(
    shape: Sequence[int],
    generator: torch.Generator | NoiseSource | ShardedGenerator | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise of ``shape`` from ``generator`` (a Generator, per-sample generators or
    another :class:`NoiseSource`, or None)."""
    if isinstance(generator, NoiseSource):
        return generator.randn(shape, device=device, dtype=dtype)
    if isinstance(generator, ShardedGenerator):
        return generator.draw(torch.randn, shape, dtype=dtype or torch.float32).to(device)
    gen_device = generator.device if generator is not None else device
    out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype or torch.float32)
    return out.to(device) if device is not None else out


def rand(
    shape: Sequence[int],
    generator: torch.Generator | ShardedGenerator | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Uniform [0, 1) numbers of ``shape`` on ``device`` from ``generator``."""
    if isinstance(generator, ShardedGenerator):
        return generator.draw(torch.rand, shape, dtype=dtype).to(device)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def randint(
    high: int,
    shape: Sequence[int],
    generator: torch.Generator | ShardedGenerator | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Integers uniform in ``[0, high)`` of ``shape`` on ``device`` from ``generator``."""
    if isinstance(generator, ShardedGenerator):
        return generator.draw(lambda s, **kw: torch.randint(0, high, s, **kw), shape).to(device)
    return torch.randint(0, high, tuple(shape), generator=generator, device=device)


def normal_rows(
    num: int, width: int, generator: torch.Generator | SampleGenerators | None, device=None
) -> Tensor:
    """(num, width) standard normals in float64, one row per sample."""
    return randn((num, width), generator, device=device, dtype=torch.float32).to(torch.float64)


def pick_components(z: Tensor, log_weights: Tensor | None, num: int) -> Tensor:
    """Component indices from standard normals ``z`` (B,): the inverse CDF of the weights at
    ``Phi(z)``, uniform over ``num`` components when ``log_weights`` is None."""
    u = torch.special.ndtr(z)
    if log_weights is None:
        return (u * num).long().clamp_(0, num - 1)
    cdf = torch.cumsum(log_weights.exp(), 0)
    return torch.searchsorted(cdf / cdf[-1], u.to(cdf)).clamp_(0, num - 1)
