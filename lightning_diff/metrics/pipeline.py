"""One evaluation for the callback and for ``ld-eval``: build the suite for a DataModule, feed it
samples, add the optional Inception metrics and the real-data baselines, and draw the memorization figures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_diff.errors import ConfigError
from lightning_diff.metrics.suite import EvaluationSuite, resolve_feature_space


def require_samples(count: int, processes: int, problem: str) -> None:
    """Refuse an evaluation of ``count`` samples on ``processes`` processes when it is too few: two for
    the Frechet distance's covariance, and one for each process. The ConfigError reads ``problem``
    followed by the least count and the reason, so ``problem`` ends where the fix's number goes."""
    least = max(2, int(processes))
    if count < least:
        raise ConfigError(f"{problem}{least} or more (two for the Frechet distance, one per process)")


def reference_key(datamodule, feature_space: str) -> str:
    """Cache key of a DataModule's training statistics: data set, subset size, seed and features."""
    n = len(datamodule.train_tensor())
    extra = getattr(datamodule, "path", "") or ""
    digest = hashlib.sha1(str(extra).encode()).hexdigest()[:8] if extra else "bundled"
    return f"{datamodule.name}-n{n}-seed{getattr(datamodule, 'seed', 0)}-{digest}-{feature_space}"


def build_suite(
    datamodule,
    feature_space: str = "auto",
    kid: bool = True,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> EvaluationSuite:
    space = resolve_feature_space(feature_space, datamodule.name, datamodule.is_image)
    cache = Path(cache_dir) / "reference" / f"{reference_key(datamodule, space)}.pt" if cache_dir else None
    return EvaluationSuite(
        datamodule.train_tensor(),
        datamodule.val_tensor(),
        datamodule.log_prob,
        data_name=datamodule.name,
        feature_space=feature_space,
        kid=kid,
        seed=seed,
        rank=rank,
        world_size=world_size,
        reference_cache=cache,
    )


def build_inception(datamodule, options: dict[str, Any] | None, cache_dir: str | Path | None):
    """The Inception metrics (torch-fidelity, :class:`~lightning_diff.metrics.fidelity.InceptionMetrics`)
    when ``options['enabled']`` and the data are images, else None. Built on the CPU: move it with ``.to``."""
    if not options or not options.get("enabled") or not datamodule.is_image:
        return None
    from lightning_diff.metrics.fidelity import InceptionMetrics

    opts = {k: v for k, v in options.items() if k != "enabled"}
    return InceptionMetrics(
        datamodule.train_tensor(),
        reference_name=reference_key(datamodule, "inception"),
        cache_dir=Path(cache_dir) / "fidelity" if cache_dir else None,
        **opts,
    )


def evaluate_samples(
    samples: Tensor,
    datamodule,
    feature_space: str = "auto",
    kid: bool = True,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    inception_options: dict[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_samples: int | None = None,
) -> tuple[dict[str, float], EvaluationSuite]:
    """All metrics of ``samples``; returns the values and the suite (for figures).

    Under DDP each rank passes its contiguous block of the ``num_samples`` samples (default: all of
    ``samples``, one process); every metric reduces its states across ranks, so every rank gets the
    single-process values. Runs on the samples' device; a collective: call on every rank. Rank 0
    alone writes the reference statistics to ``cache_dir``.
    """
    device = samples.device
    cache = cache_dir if rank == 0 else None
    suite = build_suite(datamodule, feature_space, kid, seed, cache, rank, world_size).to(device)
    for chunk in samples.split(1000):
        suite.update(chunk)
    values = suite.compute()
    values.update(suite.baselines(len(samples) if num_samples is None else num_samples))
    inception = build_inception(datamodule, inception_options, cache_dir)
    if inception is not None:
        inception = inception.to(device)
        inception.update(samples)
        values.update(inception.compute())
    return values, suite


#: The columns of :func:`memorization_rows`.
TABLE_COLUMNS = [
    "sample",
    "nearest_training",
    "sample_index",
    "training_index",
    "nn1",
    "nn1_nn2_ratio",
    "memorized",
    "copying_cell",
    "cell_z",
]


def memorization_rows(
    suite: EvaluationSuite, samples: Tensor, train: Tensor, max_rows: int = 256
) -> list[list]:
    """The ``max_rows`` most memorized samples (smallest NN1 / NN2 ratio first), each beside its nearest
    training sample, with its NN1 distance, ratio, whether it counts as memorized, its data-copying
    cell and that cell's ``z`` (negative: closer to the training set than held-out data are; NaN where
    the cell does not count). Columns :data:`TABLE_COLUMNS`; the first two are tensors. Reads gathered
    states, so under DDP every rank calls it."""
    nn1, ratio, index = suite.memorization.per_sample()
    cells = suite.copying.sample_cells() if suite.copying is not None else None
    rows = []
    for i in ratio.argsort(stable=True)[: max(int(max_rows), 0)].tolist():
        j = int(index[i])
        cell = int(cells[0][i]) if cells is not None else None
        z = float(cells[1][cell]) if cells is not None else None
        memorized = bool(ratio[i] < suite.memorization.threshold)
        rows.append([samples[i], train[j], i, j, float(nn1[i]), float(ratio[i]), memorized, cell, z])
    return rows


def wandb_table(rows: list[list]):
    """A ``wandb.Table`` of :func:`memorization_rows`: images as ``wandb.Image``, vectors as lists."""
    import wandb

    def cell(x: Tensor):
        if x.ndim == 3:  # C x H x W in [-1, 1]
            pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
            return wandb.Image(pixels.squeeze(-1).numpy() if pixels.shape[-1] == 1 else pixels.numpy())
        return [float(v) for v in x.reshape(-1)]

    return wandb.Table(columns=TABLE_COLUMNS, data=[[cell(r[0]), cell(r[1]), *r[2:]] for r in rows])


def save_memorization_figures(
    suite: EvaluationSuite,
    samples: Tensor,
    train: Tensor,
    out_dir: str | Path,
    tag: str,
    num_pairs: int = 8,
    write: bool = True,
) -> list[Path]:
    """Histograms of the NN1/NN2 ratio and of NN1 distances (with the held-out points' NN1 distances
    as a second series), the data-copying test's Z-score per cell, and (images) the most memorized
    samples above their nearest training images. Reads gathered states, so under DDP every rank
    calls it; only those with ``write`` draw and save."""
    hists = suite.memorization.histograms(bins=40)
    positions, nearest = suite.memorization.pairs(num_pairs)
    cells = suite.copying.cells() if suite.copying is not None else None
    if not write:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_diff.plotting import save_samples_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    for ax, (key, label) in zip(
        axes, [("ratio", "NN1 / NN2 distance ratio"), ("nn1", "NN1 distance")], strict=True
    ):
        counts, edges = hists[key]
        ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, label="samples")
        ax.set_xlabel(label)
        ax.set_ylabel("share")
    if "nn1_heldout" in hists:
        counts, edges = hists["nn1_heldout"]
        axes[1].stairs(counts / max(counts.sum(), 1), edges, color="black", label="held-out data")
        axes[1].legend(fontsize=7)
    axes[0].axvline(suite.memorization.threshold, color="tab:red", linestyle="--", label="memorized below")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"nn_histograms_{tag}.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    if cells is not None:
        paths.append(_save_copying_figure(cells, out_dir / f"data_copying_cells_{tag}.png", plt))
    if suite.is_image and len(positions):
        pairs = torch.cat([samples[positions.cpu()].cpu(), train[nearest.cpu()].cpu()])
        paths.append(save_samples_figure(pairs, out_dir / f"nearest_{tag}.png", nrow=len(positions)))
    return paths


def _save_copying_figure(cells: dict, path: Path, plt) -> Path:
    """Bars of the data-copying Z-score per k-means cell (hatched: too few samples to count)."""
    from lightning_diff.metrics.copying import COPYING_THRESHOLD

    z, used = cells["z"], cells["used"]
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(z) + 2), 3), dpi=100)
    positions = range(len(z))
    ax.bar(positions, [v if ok else 0.0 for v, ok in zip(z, used, strict=True)], color="tab:blue")
    for c in (c for c, ok in enumerate(used) if not ok):
        ax.bar(c, 0.5, bottom=-0.25, color="none", edgecolor="gray", hatch="//")
    ax.axhline(COPYING_THRESHOLD, color="tab:red", linestyle="--", label="copying below")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("k-means cell of the training set")
    ax.set_ylabel("Z of the U test")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_metrics(path: str | Path, metrics: dict[str, float], **extra) -> Path:
    """Merge ``metrics`` into the JSON file at ``path`` (created if missing), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(extra)
    current.update(metrics)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
