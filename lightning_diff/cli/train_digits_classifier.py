"""Rebuild the shipped digits classifier: ``python -m lightning_diff.cli.train_digits_classifier``.

Trains :class:`DigitsClassifier` on the training split of scikit-learn's digits (the split of
``DigitsDataModule`` with seed 0), reports held-out accuracy, and saves the weights (about 0.3 MB)
to ``lightning_diff/metrics/weights/digits_cnn.pt``. Deterministic on the CPU for a given seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_diff.data import DigitsDataModule
from lightning_diff.metrics.features import DIGITS_CLASSIFIER_WEIGHTS, DigitsClassifier


def train_classifier(epochs: int = 40, seed: int = 0, lr: float = 2e-3) -> tuple[DigitsClassifier, float]:
    """Train on the digits training split with one-pixel shifts; returns (model, held-out accuracy)."""
    torch.manual_seed(seed)
    dm = DigitsDataModule(seed=0)
    x, y = dm.train_tensor(), torch.as_tensor(dm.train_labels()).long()
    xv, yv = dm.val_tensor(), torch.as_tensor(dm.val_labels()).long()
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for idx in order.split(64):
            batch = x[idx]
            # Shift by up to one pixel, so features respond to shape rather than exact position.
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            batch = torch.roll(batch, shifts=(dy, dx), dims=(-2, -1))
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    return model, accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DIGITS_CLASSIFIER_WEIGHTS)
    args = parser.parse_args(argv)
    model, accuracy = train_classifier(args.epochs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"held-out accuracy {accuracy:.4f}; weights written to {args.out}")


if __name__ == "__main__":
    main()
