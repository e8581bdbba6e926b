"""The exponential moving average of the weights that samples, grids and evaluation use.

:class:`EMAUpdate` is the update rule (decay with an optional warm-up), :class:`ExponentialAverage`
an ``AveragedModel`` that applies it with cached tensor lists and no host synchronisation. The
module's ``optimizer_step`` updates it inside the step, and the EMA is part of the module's
``state_dict`` (``ema.module.*`` beside ``net.*``), so every checkpoint, whichever callback writes it
and whenever, holds both.

Why not Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` (Lightning 2.6, measured with
``bench/ema_step.py``; bench/RESULTS.md, "EMA update"):

* Raw and EMA weights in every checkpoint: not at the end of ``fit``. Its ``on_save_checkpoint``
  puts the EMA in ``state_dict`` and the raw weights in ``current_model_state``, which holds for
  periodic and preemption checkpoints; but its ``on_train_end`` first copies the EMA into the
  module, so the ``last.ckpt`` that ``RunCheckpoint`` writes there (final step not a periodic one)
  holds the EMA twice and the raw weights are lost. A checkpoint written during validation would
  have the two exchanged (it swaps them for validation).
* Exact resume: only from some files. From a periodic checkpoint a resumed run is bit-identical;
  from that end-of-fit ``last.ckpt`` it continues training from the EMA (raw and EMA both differ).
  Its update runs in the callback's ``on_train_batch_end``: listed after ``PreemptionCheckpoint``
  (as ``+callbacks.<name>=`` after the defaults puts it), the SIGTERM checkpoint holds the EMA
  without that step's update, which the resumed run then never applies.
* Cost per update, one CPU thread, caches flushed: 2.8x ours on a 6.5M-parameter UNet (245 tensors:
  15.4 against 5.5 ms) and 2.6x on a 3.6M-parameter MLP (29 tensors: 9.1 against 3.5 ms); its
  ``avg_fn`` runs per tensor. With torch's foreach EMA as ``multi_avg_fn`` it is 1.25x and 1.09x.
  On a GPU (read from the code, not measured) it builds the average in ``setup``, before the
  strategy moves the module, so by default the average sits on the CPU and every update copies
  all weights to the host.

It also averages the whole LightningModule (the data buffers included) and has no warm-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def group_by_device_and_dtype(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[list[Tensor], list[Tensor]]]:
    """``(averaged, current)`` pairs split into lists per (device, dtype) of the averaged tensor, in
    first-seen order: the groups ``AveragedModel`` hands its ``multi_avg_fn`` (one foreach call each)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for averaged, current in pairs:
        avg, cur = groups.setdefault((averaged.device, averaged.dtype), ([], []))
        avg.append(averaged)
        cur.append(current)
    return list(groups.values())


class EMAUpdate:
    """An ``AveragedModel`` update: exponential moving average with an optional warm-up.

    With warm-up the effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so
    the average is not dominated by the random initial weights in short runs (the schedule used by
    TensorFlow's ExponentialMovingAverage with ``num_updates``). Integer buffers are copied. A class
    rather than a closure, so the module pickles (``ddp_spawn``).
    """

    def __init__(self, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def __call__(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floats:
            avg, cur = [a for a, _ in floats], [c for _, c in floats]
            if self.warmup:
                # Computed on the device from the update count: no host sync in the training step.
                n = num_averaged.to(avg[0].dtype)
                weight = 1 - torch.clamp((1 + n) / (10 + n), max=self.decay)
            else:
                weight = 1 - self.decay
            torch._foreach_lerp_(avg, cur, weight)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():
                a.copy_(c)


class ExponentialAverage(AveragedModel):
    """``AveragedModel`` (buffers averaged too) with a cheaper per-step update and no host synchronisation.

    The update computes what ``AveragedModel.update_parameters`` computes, bit for bit: a copy of the
    network at the first update, then ``multi_avg_fn`` once per (device, dtype) group. Two things
    differ: the tensor lists and their grouping are built once and reused for as long as every
    buffer is still the same tensor and every group's tensors are still on their device and dtype
    (moving or loading either module, or replacing a buffer, rebuilds them); and whether an update
    is the first is decided from a count kept on the host, so the step never waits for the device.
    ``n_averaged`` and ``module.*`` remain the ``state_dict`` entries they were.
    """

    def __init__(self, model: nn.Module, multi_avg_fn: Callable[..., None]):
        super().__init__(model, multi_avg_fn=multi_avg_fn, use_buffers=True)
        self.forget_tensors()

    def forget_tensors(self) -> None:
        """Drop the cached tensor lists and the host copy of the update count (rebuilt on next use)."""
        self._cache: dict[str, Any] | None = None
        self._count: int | None = None

    @staticmethod
    def _slots(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
        return [(m, n, b) for m in module.modules() for n, b in m._buffers.items() if b is not None]

    def _cache_valid(self, model: nn.Module) -> bool:
        cache = self._cache
        if cache is None or cache["source"] is not model:
            return False
        if any(m._buffers.get(n) is not b for m, n, b in cache["slots"]):
            return False
        return all(t.device == d and t.dtype == k for t, d, k in cache["keys"])

    def _build_cache(self, model: nn.Module) -> dict[str, Any]:
        # Parameters are kept as objects (moving a module swaps their data, not the objects);
        # buffers are replaced on moves, hence the slots that are checked before every update.
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]
        if len(averaged) != len(current):
            raise ValueError("the EMA copy and the network hold different numbers of tensors")
        keys = [(t, t.device, t.dtype) for t in (*averaged, *current)]
        slots = self._slots(self.module) + self._slots(model)
        pairs = list(zip(averaged, current, strict=True))
        shared = all(a.device == c.device for a, c in pairs)
        if not shared:  # copies on the EMA's device, made for every update (as AveragedModel does)
            current = [c.detach().to(a.device) for a, c in pairs]
            pairs = list(zip(averaged, current, strict=True))
        groups = group_by_device_and_dtype(pairs)
        cache = {"source": model, "keys": keys, "slots": slots, "pairs": pairs, "groups": groups}
        self._cache = cache if shared else None
        return cache

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        cache = self._cache if self._cache_valid(model) else self._build_cache(model)
        if self._count is None:
            self._count = int(self.n_averaged)  # one read after building, moving or loading
        if self._count == 0:
            for averaged, current in cache["pairs"]:
                averaged.copy_(current)
        else:
            for averaged, current in cache["groups"]:
                self.multi_avg_fn(averaged, current, self.n_averaged.to(averaged[0].device))
        self.n_averaged.add_(1)
        self._count += 1

    def _apply(self, fn, *args, **kwargs):
        self.forget_tensors()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.forget_tensors()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_cache=None, _count=None)  # references into the source network: not pickled
        return state
