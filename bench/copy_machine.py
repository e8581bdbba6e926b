"""What the evaluation says of a copy machine, through ``ld-eval`` as a user runs it.

For each seed: 500 training digits (drawn with replacement from the training split), the same with
Gaussian noise of std 0.2 and 0.5 per pixel (data in [-1, 1]), and the held-out split itself, each
written to a ``.npy`` file and given to ``ld-eval samples=FILE data=digits``. Prints mean +- standard
deviation over the seeds of the metrics that should tell copying from generalisation.

    .venv/bin/python bench/copy_machine.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "fd_digits_cnn",
    "fd_digits_cnn_vs_heldout",
    "fd_digits_cnn_vs_heldout_floor",
    "data_copying_ct",
    "nn1_ratio_to_heldout",
    "precision_digits_cnn",
    "recall_digits_cnn",
    "memorized_fraction",
)


def splits():
    """The digits' training and held-out splits, as ``ld-eval data=digits`` (data seed 0) makes them."""
    sys.path.insert(0, str(ROOT / "bench"))
    from families import datamodule

    dm = datamodule("digits", "full", 0)
    return dm.train_tensor(), dm.val_tensor()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    train, heldout = splits()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            gen = torch.Generator().manual_seed(seed)
            picks = train[torch.randint(len(train), (500,), generator=gen)]
            cases = {
                "training digits (copies)": picks,
                "copies + noise 0.2": picks + 0.2 * torch.randn(picks.shape, generator=gen),
                "copies + noise 0.5": picks + 0.5 * torch.randn(picks.shape, generator=gen),
                "held-out digits": heldout,
            }
            for name, samples in cases.items():
                path = Path(tmp) / f"samples_{seed}.npy"
                np.save(path, samples.numpy())
                out = Path(tmp) / "metrics.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "lightning_diff.cli.evaluate",
                    f"samples={path}",
                    "data=digits",
                    f"out={out}",
                ]
                subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
                results.setdefault(name, []).append(json.loads(out.read_text()))
    Path("runs").mkdir(exist_ok=True)
    Path("runs/copy_machine.json").write_text(json.dumps(results, indent=1))
    print("| samples | " + " | ".join(KEYS) + " |")
    print("| --- " * (len(KEYS) + 1) + "|")
    for name, runs in results.items():
        cells = []
        for key in KEYS:
            values = np.array([r[f"eval/{key}"] for r in runs], dtype=float)
            spread = f" +- {values.std(ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.2f}{spread}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
