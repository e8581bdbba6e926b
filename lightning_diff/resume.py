"""What exact resume needs beyond Lightning's own checkpoint: per-rank RNG states and noise seeds.

The global generators (torch CPU and CUDA, NumPy, Python) are saved per rank in every checkpoint
and put back just before the first training step after a resume. NumPy's state is stored as a
tensor so that checkpoints stay loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

RNG_KEY = "rng_states"


def collect_rng_states() -> dict[str, Any]:
    """This process's global RNG states, as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states written by :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's states, indexed by rank (a collective when several processes train)."""
    mine = collect_rng_states()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, mine)
        return out
    return [mine]


def step_seed(seed: int, step: int, micro_batch: int = 0) -> int:
    """The seed of the training noise of optimiser step ``step`` (and micro-batch under accumulation)."""
    words = [int(seed) & 0xFFFFFFFF, int(step), int(micro_batch), 0x6E6F6973]
    return int(np.random.SeedSequence(words).generate_state(1)[0])
