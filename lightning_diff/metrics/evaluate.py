"""The feature-free evaluation every run reports, shared by the evaluation callback and ``ld-eval``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_diff.metrics.distances import moment_errors, nearest_neighbour_ratio, sliced_wasserstein

MEMORIZATION_RATIO = 1 / 3


def evaluate_samples(
    samples: Tensor,
    train: Tensor,
    heldout: Tensor | None = None,
    log_prob: Callable[[Tensor], Tensor | None] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Compare samples with the held-out set (or the training set when there is none).

    Returns (names without prefix):
      ``sliced_wasserstein`` to the reference, and ``sliced_wasserstein_floor``: the same distance
      from an equally large subset of the training set, the value a perfect model would get;
      ``mean_error``, ``cov_rel_error``; ``memorized_fraction`` (NN1 / NN2 < 1/3 against the
      training set) and ``nn1_distance`` (mean distance to the nearest training sample);
      ``data_log_prob``: the mean true log density of the samples, where the data's is known.
    """
    samples = samples.detach().float().cpu()
    train = train.detach().float().cpu()
    reference = heldout.detach().float().cpu() if heldout is not None and len(heldout) > 1 else train
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {
        "sliced_wasserstein": float(sliced_wasserstein(samples, reference, generator=gen)),
    }
    gen = torch.Generator().manual_seed(seed)
    subset = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: len(samples)]]
    out["sliced_wasserstein_floor"] = float(sliced_wasserstein(subset, reference, generator=gen))
    out.update(moment_errors(samples, reference))
    if len(train) >= 2:
        nn1, ratio = nearest_neighbour_ratio(samples, train)
        out["memorized_fraction"] = float((ratio < MEMORIZATION_RATIO).float().mean())
        out["nn1_distance"] = float(nn1.mean())
    if log_prob is not None:
        lp = log_prob(samples)
        if lp is not None:
            out["data_log_prob"] = float(lp.clamp(min=-1e4).mean())
    return out
