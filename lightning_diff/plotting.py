"""Pictures of samples: image grids and scatter plots of vector samples against the data."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def save_samples_figure(
    samples: Tensor, path: str | Path, reference: Tensor | None = None, nrow: int | None = None
) -> Path:
    """Save an image grid (for N x C x H x W; ``nrow`` images a row, default square) or a scatter
    plot (for N x D, first two coordinates, over ``reference`` in grey)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if samples.ndim == 4:
        from torchvision.utils import make_grid, save_image

        # Small images (8x8 digits) are enlarged by pixel repetition so the grid is readable.
        scale = max(1, 32 // samples.shape[-1])
        images = samples.clamp(-1, 1).repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
        nrow = nrow or max(1, int(round(samples.shape[0] ** 0.5)))
        grid = make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)
        save_image(grid, path)
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().float().cpu().reshape(reference.shape[0], -1)
        ax.scatter(ref[:, 0], ref[:, 1 % ref.shape[1]], s=2, c="0.75", label="data")
    flat = samples.reshape(samples.shape[0], -1)
    ax.scatter(flat[:, 0], flat[:, 1 % flat.shape[1]], s=2, c="tab:blue", label="samples")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def to_uint8(images: Tensor) -> Tensor:
    """Quantise images in [-1, 1] to uint8, as done before any feature extractor."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
