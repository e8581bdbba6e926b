"""Held-out negative log-likelihood through the probability-flow ODE: the computation behind the
``ODELikelihood`` callback and ``ld-eval``.

Images report bits/dim of uniformly dequantised 8-bit data (``eval/bits_per_dim``); vectors report
nats/dim (``eval/nll_nats_per_dim``). Held-out row ``i`` draws its dequantisation noise and trace
probes from the seed ``(seed, i)``, so the numbers do not depend on the batch size or on the number
of processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_diff.diffusion.log_likelihood import bits_per_dim, dequantize, ode_log_likelihood
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.errors import ConfigError
from lightning_diff.metrics.distances import random_rows


def heldout_data(datamodule, num_samples: int) -> Tensor:
    """``num_samples`` held-out samples drawn at random (a fixed draw: the same ones at every
    evaluation); an error naming the fix when there are none."""
    data = datamodule.val_tensor()
    if len(data) == 0:
        raise ConfigError(
            "the likelihood is measured on held-out data but this data set holds none out: "
            "set data.val_fraction above 0"
        )
    return random_rows(data, num_samples)


def log_likelihoods(
    model,
    data: Tensor,
    indices: Sequence[int],
    seed: int = 0,
    batch_size: int = 256,
    use_ema: bool = True,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Per-sample log-likelihood (nats) of ``data`` rows under ``model`` and the evaluations each took.

    Row ``j`` is sample ``indices[j]`` and draws from the seed ``(seed, indices[j])``. Images are
    dequantised first (:func:`dequantize`). ``options`` go to :func:`ode_log_likelihood`. Returns
    two (N,) tensors on the model's device: log-likelihoods and per-sample evaluation counts
    (each batch's mean). The flow is the model's own denoiser, never clamped to the data range
    (``clip_denoised`` is a sampling heuristic that would change the density).
    """
    denoiser = model.make_denoiser(model.ema.module if use_ema else model.net)
    was_training = denoiser.training
    denoiser.eval()
    logps, nfes = [], []
    try:
        for start in range(0, len(indices), batch_size):
            block = indices[start : start + batch_size]
            gens = SampleGenerators(block, seed=seed, device=model.device)
            x = data[start : start + len(block)].to(model.device)
            if x.ndim == 4:
                x = dequantize(x, gens)
            out = ode_log_likelihood(denoiser, x, model.schedule, generator=gens, **options)
            logps.append(out["log_likelihood"].detach())
            nfes.append(torch.full((len(block),), float(out["nfe"]), device=model.device))
    finally:
        denoiser.train(was_training)
    if not logps:
        return torch.empty(0, device=model.device), torch.empty(0, device=model.device)
    return torch.cat(logps), torch.cat(nfes)


def likelihood_metrics(log_likelihood: Tensor, nfe: Tensor, data_shape: Sequence[int]) -> dict[str, float]:
    """``bits_per_dim`` (images) or ``nll_nats_per_dim`` (vectors), averaged, and ``likelihood_nfe``."""
    is_image = len(data_shape) == 3
    num_dims = int(torch.Size(data_shape).numel())
    per_dim = bits_per_dim(log_likelihood.double(), num_dims, "images" if is_image else "vectors")
    name = "bits_per_dim" if is_image else "nll_nats_per_dim"
    return {name: float(per_dim.mean()), "likelihood_nfe": float(nfe.double().mean())}
