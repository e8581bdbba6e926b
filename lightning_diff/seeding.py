"""Every seed the package derives from a user's ``seed``, in one place.

Each random stream (the data split, the loader's shuffle, the synthetic samples, each epoch's
permutation, the training noise of each step, each generated sample) gets its own seed, mixed from
the user's seed and what the stream is for by NumPy's ``SeedSequence``: the streams stay independent
while being fully determined by ``seed``, and none of them depends on the batch size or the number of
processes.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one ``purpose`` (``"split"``, ``"loader"``, ``"synthetic"``, ``"epoch3"``).

    Seeding every stream with ``seed`` itself would make, say, the held-out permutation a function of
    the same random bits as the samples; mixing in a hash of the purpose keeps them apart.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, zlib.crc32(purpose.encode())])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derived_seed` ``(seed, purpose)``."""
    generator = torch.Generator()
    generator.manual_seed(derived_seed(seed, purpose))
    return generator


def step_seed(seed: int, step: int, micro_batch: int = 0) -> int:
    """The seed of the training noise of optimiser step ``step`` (and micro-batch under accumulation)."""
    words = [int(seed) & 0xFFFFFFFF, int(step), int(micro_batch), 0x6E6F6973]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def sample_seed(seed: int, index: int) -> int:
    """The seed of generated sample ``index``: one 32-bit word, since torch's CPU generator keeps only
    the low 32 bits of a seed (packing the pair into 64 bits would ignore ``seed``)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])
