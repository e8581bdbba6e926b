"""The learned score's deviation from the Gaussian (and other reference) scores during training.

Wang & Vastola 2024 (arXiv 2412.09726): at moderate to high noise a trained model's score is nearly
the score of the training set's Gaussian fit, learned early in training; at low noise it sits closer
to a Gaussian-mixture score than to the exact training-set (memorizing) score. This callback measures
it with :class:`~lightning_diff.metrics.score_deviation.ScoreDeviation` over a noise grid and plots
deviation against sigma, so the curves of successive steps show when each part is learned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from torch import Tensor

from lightning_diff.callbacks.periodic import PeriodicCallback, publish_metrics
from lightning_diff.callbacks.sample_grid import log_image
from lightning_diff.diffusion.denoisers import Denoiser, GaussianDenoiser
from lightning_diff.diffusion.log_likelihood import sigma_range
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.errors import ConfigError
from lightning_diff.generation import shard_indices
from lightning_diff.metrics.distances import random_rows
from lightning_diff.metrics.score_deviation import ScoreDeviation

log = logging.getLogger(__name__)

REFERENCES = ("gaussian", "gmm", "empirical")
POINTS = ("train", "heldout")
AVERAGES = ("per_sample", "pooled")
KEYS = {"per_sample": "deviation", "pooled": "pooled_deviation"}


def default_sigmas(schedule=None, num: int = 16, low: float = 0.01, high: float = 80.0) -> list[float]:
    """``num`` log-spaced noise levels from ``low`` to ``high``, narrowed to the schedule's range."""
    if schedule is not None:
        smin, smax = sigma_range(schedule)
        low, high = max(low, smin), min(high, smax)
    if not 0 < low < high:
        raise ConfigError(f"empty noise range [{low}, {high}] for the score deviation")
    return np.geomspace(low, high, num).tolist()


def build_references(
    names: Sequence[str], train: Tensor, gmm_components: int = 10, seed: int = 0
) -> dict[str, Denoiser]:
    """Reference denoisers fitted to the training set: ``gaussian`` (mean and covariance), ``gmm``
    (a Gaussian mixture) and ``empirical`` (the exact training-set score). The last two come from
    ``lightning_diff.diffusion.closed_form``; when that module cannot provide them they are skipped
    with a warning and only the Gaussian reference is kept."""
    unknown = set(names) - set(REFERENCES)
    if unknown:
        raise ConfigError(f"unknown score references {sorted(unknown)}: use some of {', '.join(REFERENCES)}")
    refs: dict[str, Denoiser] = {}
    if "gaussian" in names:
        refs["gaussian"] = GaussianDenoiser.from_data(train)
    if "gmm" in names or "empirical" in names:
        try:
            from lightning_diff.diffusion.closed_form import EmpiricalDenoiser, GaussianMixtureDenoiser
        except (ImportError, AttributeError) as err:
            log.warning("score deviation: Gaussian reference only (%s)", err)
            return refs or {"gaussian": GaussianDenoiser.from_data(train)}
        if "gmm" in names:
            refs["gmm"] = GaussianMixtureDenoiser.fit(train, num_components=gmm_components, seed=seed)
        if "empirical" in names:
            refs["empirical"] = EmpiricalDenoiser(train, chunk_size=1024)
    return refs


def log_spaced_steps(num: int, max_steps: int, first: int | None = None) -> list[int]:
    """``num`` optimiser steps spaced evenly in log from ``first`` (default ``max_steps / 100``, at
    least 1) to ``max_steps``, rounded; fewer when rounding makes neighbours equal."""
    if num < 1 or max_steps < 1:
        raise ConfigError(f"log-spaced steps need num >= 1 and max_steps >= 1, got {num} and {max_steps}")
    first = max(1, first if first is not None else max_steps // 100)
    return sorted({int(round(s)) for s in np.geomspace(min(first, max_steps), max_steps, num)})


class GaussianScoreDeviation(PeriodicCallback):
    """Every ``every_n_steps`` optimiser steps (or at ``log_spaced`` steps spaced evenly in log over
    training) and at the end of training, the deviation ``1 - EV(sigma)`` of the model's score from
    each reference score (see :mod:`lightning_diff.metrics.score_deviation`) on ``num_samples`` rows
    drawn at random once: of the training set (``points="train"``, the default and the paper's
    protocol) or of the held-out split (``points="heldout"``; the training rows when nothing is held
    out). ``average`` picks what is published as the deviation and plotted: ``per_sample`` (the
    paper's mean of per-sample ratios, the default) or ``pooled`` (a ratio of sums).

    ``sigmas`` defaults to 16 log-spaced levels from 0.01 to 80, narrowed to the model's schedule
    range. The model is its own (EMA by default) denoiser without the sampling-time clamp, which
    would change the score. Row ``i`` draws its noise from the seed ``(seed, i)`` and ranks take
    contiguous blocks of rows, so the numbers do not depend on the number of processes; every rank
    updates and computes, rank 0 alone writes files.

    Published scalars: ``deviation/<reference>/sigma_<sigma:.3g>`` and ``deviation/<reference>/mean``
    (the mean over the grid), and the other average under ``deviation_<other>/...``. Rank 0 saves
    ``score_deviation_step_XXXXXXX.png`` in ``plot_dir``: deviation against sigma on log-log axes
    for every reference at this step, and beside it the Gaussian deviation (or the first
    reference's) at every step measured so far, coloured by step.
    """

    def __init__(
        self,
        metrics_path: str | Path,
        every_n_steps: int = 500,
        num_samples: int = 256,
        sigmas: Sequence[float] | None = None,
        references: Sequence[str] = REFERENCES,
        gmm_components: int = 10,
        seed: int = 0,
        plot_dir: str | Path | None = None,
        use_ema: bool = True,
        batch_size: int = 256,
        points: str = "train",
        average: str = "per_sample",
        log_spaced: int = 0,
    ):
        super().__init__(every_n_steps)
        if points not in POINTS:
            raise ConfigError(f"callbacks.score_deviation.points={points!r}: use one of {', '.join(POINTS)}")
        if average not in AVERAGES:
            raise ConfigError(
                f"callbacks.score_deviation.average={average!r}: use one of {', '.join(AVERAGES)}"
            )
        self.points, self.average, self.log_spaced = points, average, int(log_spaced)
        self._steps: set[int] | None = None
        self.metrics_path = Path(metrics_path)
        self.num_samples = num_samples
        self.sigmas = [float(s) for s in sigmas] if sigmas is not None else None
        self.references = tuple(references)
        self.gmm_components = gmm_components
        self.seed = seed
        self.plot_dir = Path(plot_dir) if plot_dir else self.metrics_path.parent / "eval"
        self.use_ema = use_ema
        self.batch_size = batch_size
        self.history: list[tuple[int, dict[str, np.ndarray]]] = []
        self._metric: ScoreDeviation | None = None

    def metric(self, trainer: L.Trainer, pl_module) -> ScoreDeviation:
        if self._metric is None:
            sigmas = self.sigmas or default_sigmas(getattr(pl_module, "schedule", None))
            train = trainer.datamodule.train_tensor()
            refs = build_references(self.references, train, self.gmm_components, self.seed)
            self._metric = ScoreDeviation(sigmas, refs)
        self._metric.to(pl_module.device)
        self._metric.reset()
        return self._metric

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.log_spaced <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._steps is None:
            self._steps = set(log_spaced_steps(self.log_spaced, trainer.max_steps))
        if trainer.global_step in self._steps:
            self._run_once(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        metric = self.metric(trainer, pl_module)
        data = (
            trainer.datamodule.val_tensor() if self.points == "heldout" else trainer.datamodule.train_tensor()
        )
        if len(data) == 0:
            data = trainer.datamodule.train_tensor()
        data = random_rows(data, self.num_samples)
        indices = shard_indices(len(data), trainer.global_rank, trainer.world_size)
        denoiser = pl_module.make_denoiser(pl_module.ema.module if self.use_ema else pl_module.net)
        was_training = denoiser.training
        denoiser.eval()
        try:
            for start in range(0, len(indices), self.batch_size):
                block = indices[start : start + self.batch_size]
                gens = SampleGenerators(block, seed=self.seed, device=pl_module.device)
                metric.update(denoiser, data[block.start : block.stop], gens)
        finally:
            denoiser.train(was_training)
        result = metric.compute()
        named = {}
        other = next(a for a in AVERAGES if a != self.average)
        for prefix, key in (("deviation", KEYS[self.average]), (f"deviation_{other}", KEYS[other])):
            for ref, values in result.items():
                for sigma, value in zip(metric.sigmas, values[key].tolist(), strict=True):
                    named[f"{prefix}/{ref}/sigma_{sigma:.3g}"] = value
                named[f"{prefix}/{ref}/mean"] = float(values[key].mean())
        publish_metrics(trainer, named, self.metrics_path)
        step = trainer.global_step
        chosen = KEYS[self.average]
        self.history.append((step, {k: v[chosen].cpu().numpy() for k, v in result.items()}))
        if trainer.is_global_zero:
            path = self.plot(self.plot_dir / f"score_deviation_step_{step:07d}.png")
            log_image(trainer, "eval/score_deviation", path)
        return named

    def plot(self, path: Path) -> Path:
        """Deviation against sigma: every reference at the latest step, and one reference over steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path.parent.mkdir(parents=True, exist_ok=True)
        sigmas = np.asarray(self._metric.sigmas)
        step, latest = self.history[-1]
        tracked = "gaussian" if "gaussian" in latest else next(iter(latest))
        tiny = 1e-12  # exact zeros (a model equal to its reference) stay on the log axis
        fig, (now, over) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100, sharey=True)
        for name, dev in latest.items():
            now.plot(sigmas, np.maximum(dev, tiny), marker="o", ms=3, label=name)
        where = "training" if self.points == "train" else "held-out"
        now.set_title(f"step {step}: {self.average.replace('_', '-')} mean over {where} points")
        now.legend()
        cmap = plt.get_cmap("viridis")
        for k, (past_step, devs) in enumerate(self.history):
            colour = cmap(k / max(1, len(self.history) - 1))
            over.plot(sigmas, np.maximum(devs[tracked], tiny), color=colour, label=f"step {past_step}")
        over.set_title(f"{tracked} reference over training")
        if len(self.history) <= 8:
            over.legend(fontsize="small")
        for ax in (now, over):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("sigma")
            ax.grid(True, which="both", alpha=0.3)
        now.set_ylabel("1 - EV (deviation)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
