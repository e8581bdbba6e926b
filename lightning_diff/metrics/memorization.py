"""Memorization: how close generated samples come to copying training samples.

Yoon et al. 2023 and Gu et al. 2023 call a generated x memorized when
``||x - NN1(x)|| / ||x - NN2(x)|| < 1/3``, NN1 and NN2 being its nearest and second-nearest training
samples. A copy sits much closer to one training sample than to any other, while a novel sample in a
dense region sits at comparable distances from several. The distances are L2 in pixel space or in a
feature space; the metric's ``name`` says which.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_diff.metrics.distances import nearest_neighbours
from lightning_diff.metrics.frechet import chunked_features, extract_features, feature_space_name, frozen


class Memorization(Metric):
    """Nearest-neighbour memorization statistics of generated samples against a training set.

    The training set (its features, when there is a ``feature_extractor``) is kept as a buffer that
    moves with the module but is neither a metric state nor saved in ``state_dict``; every rank holds
    all of it. ``update(samples)`` finds each sample's two nearest training samples by chunked matrix
    products (:func:`~lightning_diff.metrics.distances.nearest_neighbours`, ``chunk_size`` rows at a
    time) and stores its NN1 and NN2 distances and NN1 index (``cat`` states, gathered in rank order,
    so sample positions follow the global sample order under contiguous seed sharding).

    ``compute()`` returns ``memorized_fraction`` (ratio below ``threshold``), ``ratio_mean`` and
    ``nn1_mean``; with ``heldout`` data also ``nn1_ratio_to_heldout``, the median NN1 distance of the
    samples over that of the held-out points (about 1 for a model of the distribution, well below 1
    for one that copies or adds noise to training points, above 1 for one that under-fits); with
    ``extraction_delta`` also ``extracted_count``, the number of distinct training samples some
    generated sample comes within ``extraction_delta`` of. That count follows the
    (l2, delta)-extraction of Carlini et al. 2023 only in spirit: they use a tiled L2 over image
    patches, this uses the plain L2 of the metric's space.

    ``histograms(bins)`` and ``pairs(k)`` read the gathered states too: like ``compute()`` they are
    collectives under DDP and must be called on every rank.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        train: Tensor,
        feature_extractor: nn.Module | None = None,
        name: str | None = None,
        chunk_size: int = 1024,
        threshold: float = 1 / 3,
        extraction_delta: float | None = None,
        heldout: Tensor | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(train) < 2:
            raise ValueError("memorization needs at least two training samples")
        self.feature_extractor = frozen(feature_extractor)
        self.name = feature_space_name(feature_extractor, name)
        self.chunk_size = chunk_size
        self.threshold = threshold
        self.extraction_delta = extraction_delta
        param = next(feature_extractor.parameters(), None) if feature_extractor is not None else None
        device = param.device if param is not None else train.device
        features = chunked_features(feature_extractor, train, chunk_size, device)
        self.register_buffer("train_features", features, persistent=False)
        held_nn1 = None
        if heldout is not None and len(heldout):
            held = chunked_features(feature_extractor, heldout, chunk_size, device)
            held_nn1 = nearest_neighbours(held, features, k=1, chunk_size=chunk_size)[0][:, 0]
        self.register_buffer("heldout_nn1", held_nn1, persistent=False)
        self.add_state("nn1", [], dist_reduce_fx="cat")
        self.add_state("nn2", [], dist_reduce_fx="cat")
        self.add_state("nn1_index", [], dist_reduce_fx="cat")

    def update(self, samples: Tensor) -> None:
        features = extract_features(self.feature_extractor, samples)
        distances, indices = nearest_neighbours(
            features, self.train_features, k=2, chunk_size=self.chunk_size
        )
        self.nn1.append(distances[:, 0])
        self.nn2.append(distances[:, 1])
        self.nn1_index.append(indices[:, 0])

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor]:
        """NN1 distances, NN1 / NN2 ratios and NN1 indices of all samples (states already synced)."""
        nn1, nn2 = dim_zero_cat(self.nn1), dim_zero_cat(self.nn2)
        return nn1, nn1 / nn2.clamp(min=1e-12), dim_zero_cat(self.nn1_index).long()

    def compute(self) -> dict[str, Tensor]:
        nn1, ratio, index = self._gathered()
        out = {
            "memorized_fraction": (ratio < self.threshold).double().mean(),
            "ratio_mean": ratio.double().mean(),
            "nn1_mean": nn1.double().mean(),
        }
        if self.heldout_nn1 is not None:
            held = self.heldout_nn1.double().median().clamp(min=1e-12)
            out["nn1_ratio_to_heldout"] = nn1.double().median() / held
        if self.extraction_delta is not None:
            count = index[nn1 <= self.extraction_delta].unique().numel()
            out["extracted_count"] = torch.tensor(float(count), dtype=torch.float64, device=nn1.device)
        return out

    def histograms(self, bins: int = 50) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"ratio": (counts, edges), "nn1": (counts, edges)}``, ratios binned over [0, 1]; with
        held-out data also ``"nn1_heldout"``, their NN1 distances on the same bins as ``"nn1"``."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            nn1, ratio, _ = self._gathered()
        nn1, ratio = nn1.double().cpu().numpy(), ratio.double().cpu().numpy()
        held = None if self.heldout_nn1 is None else self.heldout_nn1.double().cpu().numpy()
        top = max(float(nn1.max()), float(held.max()) if held is not None else 0.0, 1e-12)
        out = {
            "ratio": np.histogram(ratio, bins=bins, range=(0.0, 1.0)),
            "nn1": np.histogram(nn1, bins=bins, range=(0.0, top)),
        }
        if held is not None:
            out["nn1_heldout"] = np.histogram(held, bins=bins, range=(0.0, top))
        return out

    def per_sample(self) -> tuple[Tensor, Tensor, Tensor]:
        """NN1 distance, NN1 / NN2 ratio and NN1 training index of every sample, in update order
        (gathered: a collective under DDP, call on every rank)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            nn1, ratio, index = self._gathered()
        return nn1.cpu(), ratio.cpu(), index.cpu()

    def pairs(self, k: int = 8) -> tuple[Tensor, Tensor]:
        """The ``k`` most memorized samples (smallest ratio first): their positions among all samples
        in update order, and the indices of their nearest training samples."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            _, ratio, index = self._gathered()
        order = ratio.argsort(stable=True)[:k]
        return order.cpu(), index[order].cpu()
