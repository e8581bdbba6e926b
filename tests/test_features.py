"""Feature spaces: the shipped digits classifier and its rebuild command."""

from __future__ import annotations

import torch

from lightning_diff.cli.train_digits_classifier import main as rebuild
from lightning_diff.data import DigitsDataModule
from lightning_diff.metrics.features import DigitsClassifier, DigitsFeatures, RawFeatures


def test_shipped_digits_classifier_recognises_held_out_digits():
    dm = DigitsDataModule(seed=0)
    clf = DigitsFeatures().classifier
    with torch.no_grad():
        accuracy = (clf(dm.val_tensor()).argmax(1) == torch.as_tensor(dm.val_labels())).float().mean()
    assert accuracy > 0.95


def test_digits_features_shape_and_separation():
    dm = DigitsDataModule(seed=0)
    x, labels = dm.train_tensor(), torch.as_tensor(dm.train_labels())
    feats = DigitsFeatures()(x)
    assert feats.shape == (len(x), 64) and torch.isfinite(feats).all()
    # Same-class features are closer on average than different-class features.
    zeros, ones = feats[labels == 0], feats[labels == 1]
    within = torch.cdist(zeros, zeros).mean()
    between = torch.cdist(zeros, ones).mean()
    assert within < between


def test_rebuild_command_writes_loadable_weights(tmp_path, capsys):
    out = tmp_path / "w.pt"
    rebuild(["--epochs", "1", "--out", str(out)])
    assert "held-out accuracy" in capsys.readouterr().out
    model = DigitsClassifier()
    model.load_state_dict(torch.load(out, weights_only=True))
    assert DigitsFeatures(out)(torch.zeros(2, 1, 8, 8)).shape == (2, 64)


def test_raw_features_flatten():
    assert RawFeatures()(torch.ones(3, 1, 2, 2)).shape == (3, 4)
