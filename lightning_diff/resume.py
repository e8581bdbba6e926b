"""What exact resume needs beyond Lightning's own checkpoint: per-rank RNG states and noise seeds.

The global generators (torch CPU and CUDA, NumPy, Python) are saved per rank in every checkpoint
and put back just before the first training step after a resume. NumPy's state is stored as a
tensor so that checkpoints stay loadable with ``torch.load(weights_only=True)``.

Lightning's loop state is brought to one form before it is restored (:func:`align_loop_state`):
checkpoints written after a step's end hooks (at the end of ``fit``, on SIGTERM between steps or at
an epoch's end) otherwise resume a new epoch, or the right one at the wrong batch, while the data
position in the same checkpoint says the epoch is not over.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lightning_diff.lightning_internals import fit_loop_counters

RNG_KEY = "rng_states"

log = logging.getLogger("lightning_diff.resume")


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


def rank_rng_state(states: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """The saved states rank ``rank`` of ``world_size`` continues from.

    On the process count that saved them, each rank takes its own. On another count (a job requeued
    on fewer or more processes) rank ``r`` takes those of saved rank ``r mod n``: every rank starts a
    run from the same seed, so a rank duplicating another's stream is what a fresh run does. The
    data order and the training noise do not depend on these states; what draws from them
    (dropout) cannot continue as on the old count, and a line says so.
    """
    if len(states) != world_size and rank == 0:
        log.info(
            "resuming on %d processes from a checkpoint of %d: data order and training noise continue "
            "exactly, the global generators (dropout) continue from the saved ranks' states",
            world_size,
            len(states),
        )
    return states[rank % len(states)]


def align_loop_state(checkpoint: dict[str, Any]) -> bool:
    """Rewrite the fit loop's progress in ``checkpoint`` to the form Lightning writes at the end of a
    training step (``on_train_batch_end``, where periodic and preemption checkpoints are saved);
    True when something was rewritten.

    A checkpoint written after the step's end hooks has that step counted as completed, and one
    written after the epoch loop ended (``fit`` stopped by ``max_steps`` mid-epoch, then
    ``save_last`` in ``on_train_end``) also has the epoch counted as finished. Restored as they
    are, Lightning starts a new epoch, whose permutation the data position saved beside it does
    not expect, or continues an epoch at a batch index past its end. Taking back the "completed"
    marks (and the logging-step increment made with them) yields the state of the same step as
    saved at its end; Lightning's own restart logic then rolls over to the next epoch when the
    step was an epoch's last, exactly as for a periodic checkpoint. Checkpoints already in that
    form, or in one this function does not know, are left as they are.
    """
    counters = fit_loop_counters(checkpoint)
    if counters is None:
        if "loops" in checkpoint:
            log.warning(
                "the checkpoint's loop state is not laid out as Lightning 2.5/2.6 writes it, so it is "
                "restored as it is: if this checkpoint was written as fit ended, resume from a periodic "
                "step*.ckpt instead for an exact continuation"
            )
        return False
    epochs, batches, loop_state = counters
    current, total = batches["current"], batches["total"]
    after_step_end = (
        current["completed"] == current["processed"] == current["started"] == current["ready"] > 0
        and total["completed"] == total["processed"] == total["started"] == total["ready"] > 0
    )
    # The epoch either still runs (started, not processed) or was counted as finished; a checkpoint
    # of on_train_epoch_end (processed, not completed) is Lightning's own case and left alone.
    parts = (epochs["current"], epochs["total"])
    epoch_running = all(p["ready"] == p["started"] == p["processed"] + 1 == p["completed"] + 1 for p in parts)
    epoch_done = all(p["ready"] == p["started"] == p["processed"] == p["completed"] > 0 for p in parts)
    if not after_step_end or not (epoch_running or epoch_done) or loop_state["_batches_that_stepped"] < 1:
        return False
    for part in (current, total):
        part["completed"] -= 1
    loop_state["_batches_that_stepped"] -= 1
    if epoch_done:
        for part in parts:
            part["processed"] -= 1
            part["completed"] -= 1
    return True


def gather_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's states, indexed by rank (a collective when several processes train)."""
    mine = collect_rng_states()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, mine)
        return out
    return [mine]
