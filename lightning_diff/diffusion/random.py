"""Injected randomness for samplers.

A sampler draws every random number through :func:`randn` from the generator it is handed. With a
plain ``torch.Generator`` the noise depends on the batch layout. Two sources make sample ``i``'s
noise a function of ``(seed, i)`` alone, so the set of samples produced does not depend on the batch
size, on a sample's position in its batch or on how many processes share the work (the seed sharding
of Karras et al. 2022's reference generator, re-derived here):

- :class:`SampleGenerators`: sample ``i`` owns a ``torch.Generator`` seeded by ``(seed, i)``, drawn
  row by row (one kernel launch per sample and draw).
- :class:`CounterNoise`: the whole batch in one vectorised pass of Philox4x32-10 (Salmon et al. 2011,
  "Parallel random numbers: as easy as 1, 2, 3"), a counter-based generator, in torch integer ops.
  Element ``j`` of sample ``i``'s flattened row, in the ``d``-th call of ``randn`` on the object
  (``d = 0, 1, ...``), comes from the block with key ``(seed, i mod 2^32)`` and counter
  ``(j // 4, d, 0, 0)``, output word ``j % 4``. Words 0 and 1, and words 2 and 3, of a block are
  uniforms ``u = (x + 0.5) / 2^32`` paired by Box-Muller in float64:
  ``z_a = sqrt(-2 ln u_a) cos(2 pi u_b)``, ``z_b = sqrt(-2 ln u_a) sin(2 pi u_b)``, then cast to the
  requested dtype; an odd-length row drops the unused last normal. These streams differ from
  :class:`SampleGenerators`' (the same ``(seed, i)`` gives other noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_diff.errors import ConfigError
from lightning_diff.seeding import sample_seed


@runtime_checkable
class NoiseSource(Protocol):
    """Anything that hands out a sampler's Gaussian draws itself (:class:`SampleGenerators`,
    :class:`CounterNoise`; the scripted noise with which :mod:`lightning_diff.diffusion.propagate`
    reads off a sampler's output distribution)."""

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


# Philox4x32 round multipliers and key increments (Salmon et al. 2011; the constants of Random123).
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(multiplier: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``multiplier * x`` for a 32-bit constant and int64 words ``x``.

    The multiplier is split into 16-bit halves, so every partial product stays below ``2^48`` and
    int64 arithmetic is exact (no signed overflow) on every device:
    ``m x = (m_hi x) 2^16 + m_lo x``. Both results are new tensors.
    """
    low = x * (multiplier & 0xFFFF)
    high = x * (multiplier >> 16)
    low += (high & 0xFFFF) << 16
    high >>= 16
    high += low >> 32
    low &= _MASK32
    return high, low


def philox4x32(
    counter: Sequence[Tensor | int], key: Sequence[Tensor | int], rounds: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Philox4x32 bijection of ``counter`` (four 32-bit words) under ``key`` (two words).

    Words are int64 tensors (or ints) holding values in ``[0, 2^32)``; they broadcast against each
    other, and the four output words come back as int64 tensors of the broadcast shape. Every
    intermediate word is masked to 32 bits, so the output is bit-identical on every device.
    ``rounds=10`` is Philox4x32-10, the generator of :class:`CounterNoise`.
    """
    tensors = [w for w in (*counter, *key) if isinstance(w, Tensor)]
    device = tensors[0].device if tensors else None
    c0, c1, c2, c3, k0, k1 = (
        torch.as_tensor(w, dtype=torch.int64, device=device) & _MASK32 for w in (*counter, *key)
    )
    # The counter is spread over the output's shape once; the key keeps its own (smaller) shape.
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape, k0.shape, k1.shape)
    c0, c1, c2, c3 = (c.expand(shape) for c in (c0, c1, c2, c3))
    for r in range(rounds):
        if r > 0:
            k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        hi1 ^= c1
        hi1 ^= k0
        hi0 ^= c3
        hi0 ^= k1
        c0, c1, c2, c3 = hi1, lo1, hi0, lo0
    return c0, c1, c2, c3


def _box_muller(u_a: Tensor, u_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two independent standard normals from two uniform words, in float64."""
    to_uniform = 1.0 / 2.0**32
    u_a = (u_a.to(torch.float64) + 0.5) * to_uniform  # in (0, 1): the log is finite
    theta = (u_b.to(torch.float64) + 0.5) * (2.0 * math.pi * to_uniform)
    radius = torch.sqrt(-2.0 * torch.log(u_a))
    return radius * torch.cos(theta), radius * torch.sin(theta)


class CounterNoise:
    """Per-sample Gaussian noise from Philox4x32-10, drawn for the whole batch at once.

    A drop-in for :class:`SampleGenerators` (same constructor, a :class:`NoiseSource`): the noise of
    sample ``i`` depends only on ``(seed, i)`` and on how many draws came before, not on the batch it
    is drawn in, its position there or the number of processes sharing the work. The streams are
    not :class:`SampleGenerators`' ones. The stream, for sample index ``i``, the ``d``-th call of
    :meth:`randn` on this object (``d = 0, 1, ...``) and element ``j`` of the sample's flattened row:

    - Philox4x32-10 (Salmon et al. 2011) with key ``(k0, k1) = (seed, i mod 2^32)`` and counter
      ``(c0, c1, c2, c3) = (j // 4, d, 0, 0)``; the element comes from output word ``j % 4``;
    - words 0 and 1, and words 2 and 3, of each block pair up through Box-Muller in float64, with
      uniforms from the full 32-bit words, ``u = (x + 0.5) / 2^32`` (never 0 or 1):
      ``z_a = sqrt(-2 ln u_a) cos(2 pi u_b)`` and ``z_b = sqrt(-2 ln u_a) sin(2 pi u_b)``, where
      ``(a, b)`` is ``(0, 1)`` or ``(2, 3)``; the result is cast to the requested dtype (float32 by
      default). A row with an odd number of elements drops the unused last normal.

    ``seed`` must lie in ``[0, 2^32)`` (a ConfigError, a ValueError, otherwise); indices ``2^32``
    apart share a stream, and so do calls ``2^32`` apart. The 32x32-bit products are split into
    16-bit halves in int64, so the words are bit-identical on every device; the normals then agree
    to the rounding of the device's float64 ``log``, ``cos`` and ``sin``.

    The call counter ``d`` is a Python int on the host, advanced by each :meth:`randn`: draws must stay
    outside any captured CUDA graph, whose replay would repeat the captured counter. The samplers'
    ``compile`` modes (:mod:`lightning_diff.diffusion.compiled`) capture only the network call and
    draw the noise eagerly, so they qualify.

    A draw costs a fixed number of kernels whatever the batch size (about 220 integer passes over the
    batch), against one kernel per sample for :class:`SampleGenerators`; on the CPU the integer rounds
    make it the slower of the two (``bench/noise_draws.py``, ``bench/RESULTS.md``).
    """

    def __init__(self, indices: Sequence[int], seed: int = 0, device: torch.device | str = "cpu"):
        seed = int(seed)
        if not 0 <= seed <= _MASK32:
            raise ConfigError(
                f"CounterNoise seed must be in [0, 2**32), got {seed}: pick a smaller seed for noise=philox"
            )
        self.indices = list(indices)
        self.seed = seed
        self.device = torch.device(device)
        self.calls = 0
        self._keys = torch.tensor([int(i) & _MASK32 for i in self.indices], dtype=torch.int64)
        self._keys = self._keys.to(self.device).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> Tensor:
        if shape[0] != len(self.indices):
            raise ValueError(f"batch of {shape[0]} but {len(self.indices)} per-sample streams")
        numel = math.prod(int(s) for s in shape[1:])
        blocks = torch.arange((numel + 3) // 4, dtype=torch.int64, device=self.device).unsqueeze(0)
        d, self.calls = self.calls, self.calls + 1
        x0, x1, x2, x3 = philox4x32((blocks, d, 0, 0), (self.seed, self._keys))
        z0, z1 = _box_muller(x0, x1)
        z2, z3 = _box_muller(x2, x3)
        rows = torch.stack((z0, z1, z2, z3), dim=-1).reshape(len(self.indices), 4 * blocks.shape[1])
        rows = rows[:, :numel]
        return rows.reshape(tuple(shape)).to(device=device or self.device, dtype=dtype or torch.float32)


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
