"""A plain Adam loop over the kernel score's own parameters, for the tests of its maths (the library
fits the kernel model through its LightningModule, ``models/kernel_wpo.py``)."""

from __future__ import annotations

import torch

from lightning_diff.diffusion.kernel_score import KernelScore, loo_objective


def fit_precisions(
    kernel: KernelScore,
    steps: int = 200,
    lr: float = 0.05,
    loo: bool = True,
    batch_size: int | None = None,
    sigma: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Fit the local precisions by implicit (Hyvarinen) score matching of the data-time mixture.

    Adam on ``log p_i`` (and ``U_i``) minimising :func:`loo_objective` over mini-batches of
    ``batch_size`` training points (all of them when None). ``loo=False`` scores each point under a
    mixture that contains its own kernel: the objective is then unbounded below as ``p_i -> inf``
    (the memorizing optimum) and is only there to demonstrate that. ``sigma > 0`` fits the mixture
    smoothed by that much noise instead (ours, not the paper's). Returns the loss per step.
    """
    opt = torch.optim.Adam(
        [p for p in kernel.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    gen = torch.Generator().manual_seed(int(seed))
    n = kernel.num_points
    history = []
    for _ in range(int(steps)):
        idx = None
        if batch_size is not None and batch_size < n:
            idx = torch.randperm(n, generator=gen)[:batch_size].to(kernel.points.device)
        loss = loo_objective(kernel, idx, sigma, loo)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history
