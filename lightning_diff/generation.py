"""Seed-sharded generation: sample ``i`` always comes from the seed ``(seed, i)``.

Every process draws a contiguous block of sample indices, so the set of samples does not depend on
the batch size or on the number of processes (Karras et al. 2022's reference generator shards the
same way).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_diff.diffusion.random import CounterNoise, SampleGenerators
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.errors import ConfigError

#: ``noise=`` of :func:`generate`, ld-sample and ld-eval: where sample ``i``'s noise comes from.
#: ``generators``: a ``torch.Generator`` per sample (one kernel per sample and draw); ``philox``:
#: Philox4x32-10 streams keyed by ``(seed, i)``, the whole batch at once. Both make the samples
#: independent of the batch size and process count; they are different streams (other samples).
NOISE_SOURCES = {"generators": SampleGenerators, "philox": CounterNoise}


def shard_indices(num_samples: int, rank: int = 0, world_size: int = 1) -> range:
    """This rank's contiguous block of ``0 .. num_samples - 1``; blocks of ``ceil(N / world_size)``,
    the last ones shorter (possibly empty)."""
    per_rank = math.ceil(num_samples / world_size)
    return range(min(num_samples, rank * per_rank), min(num_samples, (rank + 1) * per_rank))


def gather_shards(module, local: Tensor, num_samples: int, world_size: int) -> Tensor:
    """Every rank's block (from :func:`shard_indices`) in index order, on every rank.

    ``module.all_gather`` (Lightning's) needs equal shapes, so blocks are padded to the common
    length and the padding is dropped afterwards. A collective: call on every rank.
    """
    if world_size == 1:
        return local
    per_rank = math.ceil(num_samples / world_size)
    padded = local.new_zeros(per_rank, *local.shape[1:])
    padded[: len(local)] = local
    gathered = module.all_gather(padded)
    lengths = [len(shard_indices(num_samples, r, world_size)) for r in range(world_size)]
    return torch.cat([gathered[r, :n] for r, n in enumerate(lengths)])


@torch.no_grad()
def generate(
    model,
    indices: range,
    data_shape: tuple[int, ...],
    sampler: Sampler | None = None,
    seed: int = 0,
    batch_size: int = 256,
    use_ema: bool = True,
    noise: str = "generators",
) -> tuple[Tensor, int]:
    """Samples for the given indices, in index order, and the model evaluations per sample;
    ``noise`` picks the per-sample noise source (:data:`NOISE_SOURCES`)."""
    if noise not in NOISE_SOURCES:
        raise ConfigError(f"unknown noise={noise!r}: use one of {', '.join(NOISE_SOURCES)}")
    chunks, nfe = [], 0
    for start in range(0, len(indices), batch_size):
        block = indices[start : start + batch_size]
        gens = NOISE_SOURCES[noise](block, seed=seed, device=model.device)
        x, nfe = model.sample(len(block), data_shape, sampler=sampler, generator=gens, use_ema=use_ema)
        chunks.append(x)
    if not chunks:
        return torch.empty(0, *data_shape, device=model.device), 0
    return torch.cat(chunks), nfe
