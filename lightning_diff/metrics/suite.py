"""The set of metrics a run reports, chosen for its data, shared by the evaluation callback and ``ld-eval``.

Every metric is a torchmetrics ``Metric`` (states reduced across processes), so the suite gives the
same numbers on 1 or N processes when each process updates it with its share of the samples.

Vectors: Frechet and kernel distances over raw coordinates (``fd_raw``, ``kid_raw``), sliced
Wasserstein distance, MMD, total variation between 2-D histograms, the true log density of the
samples where the data's is known, and memorization. Images: Frechet and kernel distances in a
feature space (``digits_cnn`` for the digits, else ``raw`` pixels unless configured), sliced
Wasserstein distance over pixels and memorization in pixel space. Inception metrics (torch-fidelity)
are added by the callers on request.

References: Frechet and kernel distances, and memorization, compare with the training set (the FID
convention); the distances over coordinates compare with the held-out split. ``baselines()``
reports what real data score: held-out data in the Frechet distance, training data in the sliced
Wasserstein distance (with at most as many points as there are held-out samples; both distances
shrink as the number of points grows, so compare at equal counts).

Without a held-out split (``data.val_fraction=0``, or fewer than two held-out samples) the training
set never stands in for it silently: the baselines are omitted (held-out data scored against
themselves give 0), and the distances that would use the held-out split are computed against the
training set and named for it (``sliced_wasserstein_vs_train``, ``mmd_vs_train``,
``tv_hist_vs_train``). One info line says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_diff.errors import ConfigError
from lightning_diff.generation import shard_indices
from lightning_diff.metrics.copying import DataCopying
from lightning_diff.metrics.distances import random_rows
from lightning_diff.metrics.features import DigitsFeatures, RawFeatures
from lightning_diff.metrics.frechet import FrechetDistance, KernelDistance, chunked_features, extract_features
from lightning_diff.metrics.heldout import HeldoutComparison
from lightning_diff.metrics.memorization import Memorization
from lightning_diff.metrics.vector import MMD, DataLogLikelihood, HistogramTV, SlicedWasserstein

FEATURE_SPACES = ("auto", "raw", "digits_cnn")
# The metrics whose reference is the held-out split; without one they are computed against the
# training set and carry this suffix.
HELDOUT_REFERENCED = ("sliced_wasserstein", "mmd", "tv_hist")
VS_TRAIN = "_vs_train"
FEATURE_CHUNK = 1024  # rows through the feature extractor at a time

log = logging.getLogger("lightning_diff.metrics")


def resolve_feature_space(space: str, data_name: str, is_image: bool) -> str:
    """``auto``: the digits classifier for the digits, raw coordinates or pixels otherwise."""
    if space == "auto":
        return "digits_cnn" if is_image and data_name == "digits" else "raw"
    if space not in FEATURE_SPACES:
        raise ConfigError(f"unknown feature space {space!r}: use one of {', '.join(FEATURE_SPACES)}")
    return space


def feature_extractor(space: str, data_name: str, is_image: bool) -> nn.Module:
    space = resolve_feature_space(space, data_name, is_image)
    if space == "raw":
        return RawFeatures()
    return DigitsFeatures()


class EvaluationSuite(nn.Module):
    """Metrics of generated samples against a data set's training and held-out splits.

    Args:
        train, heldout: the data's splits in data space. Without a held-out split (None, or fewer
            than two samples) the baselines are omitted and the held-out-referenced distances are
            computed against the training set under ``<name>_vs_train`` (see the module docstring).
        log_prob: the data's exact log density, or None.
        feature_space: see :func:`feature_extractor`.
        kid: also compute the kernel distance in the feature space.
        rank, world_size: this process's share of the training set when adding it to ``cat``
            states, so the gathered reference holds each training sample once.
        reference_cache: a file to keep the training set's feature statistics in (computed once).
    """

    def __init__(
        self,
        train: Tensor,
        heldout: Tensor | None = None,
        log_prob=None,
        data_name: str = "",
        feature_space: str = "auto",
        kid: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        reference_cache: str | Path | None = None,
    ):
        super().__init__()
        train = train.float()
        self.has_heldout = heldout is not None and len(heldout) > 1
        # Without a held-out split the distances below compare with the training set, and say so.
        self.heldout = heldout.float() if self.has_heldout else None
        reference = self.heldout if self.has_heldout else train
        self.suffix = "" if self.has_heldout else VS_TRAIN
        self.is_image = train.ndim == 4
        self.train = train
        extractor = feature_extractor(feature_space, data_name, self.is_image)
        dim = int(train[:1].reshape(1, -1).shape[1]) if isinstance(extractor, RawFeatures) else None
        self.frechet = FrechetDistance(extractor, feature_dim=dim, reset_real_features=False)
        self._set_frechet_reference(train, reference_cache)
        self.kid = KernelDistance(extractor, seed=seed) if kid else None
        # Contiguous blocks, gathered in rank order, rebuild the training set's own order, so the
        # kernel distance's random subsets (and its value) match a single process's.
        block = shard_indices(len(train), rank, world_size)
        self._kid_reference = train[block.start : block.stop]
        if self.kid is not None:
            self.kid.update(self._kid_reference, real=True)
        self.memorization = Memorization(train, heldout=self.heldout)
        # What a copy machine cannot win: the data-copying test and the held-out comparisons at
        # equal size, in the Frechet distance's feature space. Both take features extracted once
        # here (and once per batch in update), not each through the extractor.
        self.copying: DataCopying | None = None
        self.heldout_comparison: HeldoutComparison | None = None
        if self.has_heldout:
            train_f = chunked_features(extractor, train, FEATURE_CHUNK)
            held_f = chunked_features(extractor, self.heldout, FEATURE_CHUNK)
            self.copying = DataCopying(train_f, held_f, name=self.frechet.name, seed=seed)
            self.heldout_comparison = HeldoutComparison(train_f, held_f, name=self.frechet.name, seed=seed)
        self.sliced_wasserstein = SlicedWasserstein(reference, seed=seed)
        self.vector_metrics = nn.ModuleDict()
        if not self.is_image:
            self.vector_metrics["mmd"] = MMD(reference, seed=seed)
            if train.shape[1] == 2:
                self.vector_metrics["tv_hist"] = HistogramTV(reference, bins=16)
            if log_prob is not None and log_prob(train[:2]) is not None:
                self.vector_metrics["data_log_prob"] = DataLogLikelihood(log_prob)
        if not self.has_heldout and rank == 0:
            named = [f"{name}{VS_TRAIN}" for name in self._heldout_referenced()]
            log.info(
                "no held-out split (data.val_fraction=0): omitting %s_heldout and sliced_wasserstein_train, "
                "and reporting %s against the training set; set data.val_fraction=0.1 (or any value "
                "above 0) for the held-out metrics",
                self.frechet.key,
                ", ".join(named),
            )

    def _heldout_referenced(self) -> list[str]:
        """Names of this suite's metrics that take the held-out split as their reference."""
        return ["sliced_wasserstein"] + [k for k in self.vector_metrics if k in HELDOUT_REFERENCED]

    def _set_frechet_reference(self, train: Tensor, cache: str | Path | None) -> None:
        path = Path(cache) if cache else None
        if path is not None and path.is_file():
            stats = torch.load(path, map_location="cpu", weights_only=True)
            self.frechet.set_reference(stats["mean"], stats["cov"], int(stats["n"]))
            return
        # Every rank holds the whole training set: its statistics are computed locally, never synced.
        probe = FrechetDistance(
            self.frechet.feature_extractor, feature_dim=self.frechet.feature_dim, sync_on_compute=False
        )
        probe.update(train, real=True)
        stats = probe.reference_stats()
        self.frechet.set_reference(stats.mean, stats.cov, stats.n)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"mean": stats.mean, "cov": stats.cov, "n": stats.n}, tmp)
            tmp.replace(path)

    def metrics(self) -> list[nn.Module]:
        found = [self.frechet, self.memorization, self.sliced_wasserstein, *self.vector_metrics.values()]
        optional = [self.kid, self.copying, self.heldout_comparison]
        return found + [m for m in optional if m is not None]

    @torch.no_grad()
    def update(self, samples: Tensor) -> None:
        samples = samples.float()
        self.frechet.update(samples, real=False)
        if self.kid is not None:
            self.kid.update(samples, real=False)
        self.memorization.update(samples)
        if self.copying is not None and self.heldout_comparison is not None:
            features = extract_features(self.frechet.feature_extractor, samples)
            self.copying.update(features)
            self.heldout_comparison.update(features)
        self.sliced_wasserstein.update(samples)
        for metric in self.vector_metrics.values():
            metric.update(samples)

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """All values, by name. A collective under DDP: call on every rank."""
        out = {self.frechet.key: float(self.frechet.compute())}
        if self.kid is not None:
            mean, std = self.kid.compute()
            out[f"{self.kid.key}_mean"], out[f"{self.kid.key}_std"] = float(mean), float(std)
        out.update({k: float(v) for k, v in self.memorization.compute().items()})
        for metric in (self.copying, self.heldout_comparison):
            if metric is not None:
                out.update({k: float(v) for k, v in metric.compute().items()})
        out[f"sliced_wasserstein{self.suffix}"] = float(self.sliced_wasserstein.compute())
        for key, metric in self.vector_metrics.items():
            name = f"{key}{self.suffix}" if key in HELDOUT_REFERENCED else key
            out[name] = float(metric.compute())
        return out

    def reset(self) -> None:
        """Forget the generated samples; the training-set side of every metric stays."""
        for metric in self.metrics():
            metric.reset()
        if self.kid is not None:
            self.kid.update(self._kid_reference.to(self.frechet.device), real=True)

    @torch.no_grad()
    def baselines(self, num_samples: int) -> dict[str, float]:
        """What real data score with up to ``num_samples`` points (computed locally, no sync): the
        Frechet distance of held-out data to the training statistics (``fd_<space>_heldout``) and
        the sliced Wasserstein distance of training data to the held-out set
        (``sliced_wasserstein_train``). Empty without a held-out split: there is no real data
        apart from the training set to score."""
        if not self.has_heldout:
            return {}
        fd = FrechetDistance(
            self.frechet.feature_extractor, feature_dim=self.frechet.feature_dim, sync_on_compute=False
        ).to(self.frechet.device)
        fd.set_reference(self.frechet.ref_mean, self.frechet.ref_cov, self.frechet.ref_n)
        seed = self.sliced_wasserstein.seed
        fd.update(random_rows(self.heldout, num_samples, seed).to(self.frechet.device), real=False)
        sw = SlicedWasserstein(self.heldout, seed=seed, sync_on_compute=False)
        sw.update(random_rows(self.train, num_samples, seed))
        return {
            f"{self.frechet.key}_heldout": float(fd.compute()),
            "sliced_wasserstein_train": float(sw.compute()),
        }
