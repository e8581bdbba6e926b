"""One evaluation for the callback and for ``ld-eval``: build the suite for a DataModule, feed it
samples, add the optional Inception metrics and the real-data baselines, and draw the memorization figures."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_diff.metrics.suite import EvaluationSuite, resolve_feature_space


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


def inception(
    samples: Tensor, datamodule, options: dict[str, Any] | None, cache_dir: str | Path | None
) -> dict[str, float]:
    """Inception metrics through torch-fidelity when ``options['enabled']`` (images only)."""
    if not options or not options.get("enabled") or not datamodule.is_image:
        return {}
    from lightning_diff.metrics.fidelity import inception_metrics

    opts = {k: v for k, v in options.items() if k != "enabled"}
    return inception_metrics(
        samples,
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
) -> tuple[dict[str, float], EvaluationSuite]:
    """All metrics of ``samples`` in one process; returns the values and the suite (for figures)."""
    suite = build_suite(datamodule, feature_space, kid, seed, cache_dir)
    for chunk in samples.split(1000):
        suite.update(chunk)
    values = suite.compute()
    values.update(suite.baselines(len(samples)))
    values.update(inception(samples, datamodule, inception_options, cache_dir))
    return values, suite


def save_memorization_figures(
    suite: EvaluationSuite,
    samples: Tensor,
    train: Tensor,
    out_dir: str | Path,
    tag: str,
    num_pairs: int = 8,
    write: bool = True,
) -> list[Path]:
    """Histograms of the NN1/NN2 ratio and of NN1 distances, and (images) the most memorized samples
    above their nearest training images. Reads gathered states, so under DDP every rank calls it;
    only those with ``write`` draw and save."""
    hists = suite.memorization.histograms(bins=40)
    positions, nearest = suite.memorization.pairs(num_pairs)
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
        ax.stairs(counts, edges, fill=True)
        ax.set_xlabel(label)
    axes[0].axvline(suite.memorization.threshold, color="tab:red", linestyle="--", label="memorized below")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"nn_histograms_{tag}.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    if suite.is_image and len(positions):
        pairs = torch.cat([samples[positions.cpu()].cpu(), train[nearest.cpu()].cpu()])
        paths.append(save_samples_figure(pairs, out_dir / f"nearest_{tag}.png", nrow=len(positions)))
    return paths


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
