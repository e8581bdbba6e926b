"""Injected randomness for samplers.

A sampler draws every random number through :func:`randn` from the generator it is handed. With a
plain ``torch.Generator`` the noise depends on the batch layout. With :class:`SampleGenerators`,
sample ``i`` owns a generator seeded by ``(seed, i)``, so the set of samples produced does not
depend on the batch size or on how many processes share the work (the seed sharding of Karras et
al. 2022's reference generator, re-derived here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class SampleGenerators:
    """One ``torch.Generator`` per sample, seeded from ``(seed, index)``, drawn row by row.

    The pair is mixed into one 32-bit word by NumPy's ``SeedSequence``: torch's CPU generator keeps
    only the low 32 bits of a seed, so packing the pair into 64 bits would ignore ``seed``.
    """

    def __init__(self, indices: Sequence[int], seed: int = 0, device: torch.device | str = "cpu"):
        self.indices = list(indices)
        self.device = torch.device(device)
        self.generators = []
        for i in self.indices:
            g = torch.Generator(device=self.device)
            g.manual_seed(int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0]))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], device=None, dtype=None) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} but {len(self.generators)} per-sample generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=self.device) for g in self.generators]
        return torch.stack(rows).to(device=device or self.device, dtype=dtype or torch.float32)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | SampleGenerators | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise of ``shape`` from ``generator`` (a Generator, per-sample generators, or None)."""
    if isinstance(generator, SampleGenerators):
        return generator.randn(shape, device=device, dtype=dtype)
    gen_device = generator.device if generator is not None else device
    out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype or torch.float32)
    return out.to(device) if device is not None else out
