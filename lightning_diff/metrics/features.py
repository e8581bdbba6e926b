"""Feature spaces for Frechet-type metrics, each with a name that is put in the metric's name.

``raw``: the flattened data itself (vectors, or pixels). ``digits_cnn``: the penultimate layer of a
small classifier trained on scikit-learn's digits and shipped with the package, the default feature
space for the digits demo (Inception-v3 features of 8x8 digits say little, and Inception on the
CPU runs at a few images per second). Inception-v3 features come through torch-fidelity
(``lightning_diff.metrics.fidelity``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIGITS_CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "digits_cnn.pt"


class RawFeatures(nn.Module):
    """The data as its own feature space: flattened coordinates or pixels."""

    name = "raw"

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).float()


class DigitsClassifier(nn.Module):
    """A small CNN for 1 x 8 x 8 digits in [-1, 1]; ``features`` is its 64-d penultimate layer."""

    name = "digits_cnn"
    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitsFeatures(nn.Module):
    """The shipped digits classifier as a feature extractor (weights loaded from ``weights``)."""

    name = "digits_cnn"
    feature_dim = DigitsClassifier.feature_dim

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        path = Path(weights) if weights else DIGITS_CLASSIFIER_WEIGHTS
        if not path.is_file():
            from lightning_diff.errors import ConfigError

            raise ConfigError(
                f"digits classifier weights {path} not found: rebuild them with "
                "`python -m lightning_diff.cli.train_digits_classifier`"
            )
        self.classifier = DigitsClassifier()
        self.classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.classifier.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)
