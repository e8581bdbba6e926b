"""A training sampler whose order is a pure function of ``(seed, epoch)`` and that resumes mid-epoch.

Each epoch draws one *global* permutation of the training set from ``(seed, epoch)``. Step ``b`` of
the epoch uses the global batch ``perm[b * G : (b + 1) * G]`` (``G`` the global batch size) and rank
``r`` of ``R`` takes the contiguous slice ``[r * G / R, (r + 1) * G / R)`` of it. The union of the
ranks' batches at every step is therefore the batch one process would train on, whatever the
number of processes. ``skip`` batches at the start of an epoch can be left out, which is how a run
resumed from a checkpoint written mid-epoch continues with the batches it had not seen yet.

Random horizontal flips are decided here as well (one coin per sample and epoch, from the same
seeded stream) and passed on by yielding ``i + n`` instead of ``i`` for a flipped sample, so that
augmentation never draws from a global generator and replays exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from lightning_diff.seeding import derived_seed


class ResumableSampler(DistributedSampler):
    """Shards one seeded global permutation per epoch over ranks; can skip consumed batches.

    A subclass of ``DistributedSampler`` only so that Lightning leaves it in place under DDP
    (it replaces any other sampler by its own ``DistributedSampler``).

    Args:
        num_samples_total: size ``n`` of the training set.
        device_batch_size: samples per rank and step.
        num_replicas, rank: the process group's size and this process's rank.
        seed: the data seed; the order of epoch ``e`` depends on ``(seed, e)`` only.
        drop_last: drop the last incomplete global batch. Without it, the last global batch is
            padded (by wrapping around the permutation) to a multiple of ``num_replicas`` so that
            every rank gets the same number of samples; on one process nothing is padded.
        flip_coins: also draw one flip per sample and encode it as ``i + n``.
    """

    def __init__(
        self,
        num_samples_total: int,
        device_batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = True,
        flip_coins: bool = False,
    ):
        # The parent's constructor is bypassed: it wants a dataset and an initialised process group.
        self.n = int(num_samples_total)
        self.device_batch_size = int(device_batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.flip_coins = bool(flip_coins)
        self.shuffle = True
        self.epoch = 0
        self._skip = 0
        self._skip_epoch = 0

    @property
    def global_batch_size(self) -> int:
        return self.device_batch_size * self.num_replicas

    def num_batches(self) -> int:
        """Steps per epoch."""
        g = self.global_batch_size
        return self.n // g if self.drop_last else -(-self.n // g)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_batches(self, epoch: int, num_batches: int) -> None:
        """Leave out the first ``num_batches`` batches the next time epoch ``epoch`` is iterated."""
        self._skip_epoch, self._skip = int(epoch), int(num_batches)
        self.epoch = int(epoch)

    def _global_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen = torch.Generator().manual_seed(derived_seed(self.seed, f"epoch{epoch}"))
        perm = torch.randperm(self.n, generator=gen)
        coins = torch.rand(self.n, generator=gen) < 0.5 if self.flip_coins else None
        return perm, coins

    def _rank_batches(self, epoch: int) -> list[torch.Tensor]:
        perm, coins = self._global_order(epoch)
        items = perm + self.n * coins[perm].long() if coins is not None else perm
        g, b = self.global_batch_size, self.device_batch_size
        batches = []
        for start in range(0, self.num_batches() * g, g):
            chunk = items[start : start + g]
            if chunk.numel() < g:  # the last, incomplete global batch (drop_last=False)
                if self.num_replicas == 1:
                    batches.append(chunk)
                    continue
                per_rank = -(-chunk.numel() // self.num_replicas)
                pad = per_rank * self.num_replicas - chunk.numel()
                chunk = torch.cat([chunk, items[:pad]]) if pad else chunk
                b = per_rank
            batches.append(chunk[self.rank * b : (self.rank + 1) * b])
        return batches

    def __iter__(self) -> Iterator[int]:
        # The body runs at the first ``next``, so it sees the epoch set just before iteration.
        skip = self._skip if self._skip_epoch == self.epoch else 0
        self._skip = 0
        for batch in self._rank_batches(self.epoch)[skip:]:
            yield from batch.tolist()

    def __len__(self) -> int:
        g, full = self.global_batch_size, self.n // self.global_batch_size
        rest = 0 if self.drop_last else self.n - full * g
        if rest and self.num_replicas > 1:
            rest = -(-rest // self.num_replicas)
        return full * self.device_batch_size + rest
