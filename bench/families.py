"""Kernel WPO vs DDPM vs score SDE across training-set sizes: training time, sample quality, memorization.

Each (data, family, size) cell is one ``ld-train`` run of the family's experiment with
``data.num_train=size`` and a fixed step budget, in ``runs/families/<data>/<family>_<size>``. Training
wall time is Lightning's ``Timer`` callback (the ``train`` stage only: no start-up, no final
evaluation), read from the last checkpoint; quality and memorization are the run's ``metrics.json``
(evaluated against the run's own training subset). Cells already done are reused, so the script can
be stopped and restarted.

    .venv/bin/python bench/families.py --data moons --sizes 32 128 512 2000
    .venv/bin/python bench/families.py --data digits --sizes 32 256 full

Prints a Markdown table (and writes it to ``runs/families/<data>/table.md``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# The experiment of each family per data set, and the steps every size gets.
EXPERIMENTS = {
    "moons": {
        "ddpm": ["experiment=moons_ddpm"],
        "score_sde": ["experiment=moons_score_sde", "trainer.max_steps=2000", "sampler.num_steps=200"],
        "kernel_wpo": ["experiment=moons_kernel_wpo"],
    },
    "digits": {
        "ddpm": ["experiment=digits_ddpm"],
        "score_sde": ["experiment=digits_score_sde"],
        "kernel_wpo": ["experiment=digits_kernel_wpo"],
    },
}
QUALITY = {"moons": "eval/sliced_wasserstein", "digits": "eval/fd_digits_cnn"}


def train_seconds(ckpt: Path) -> float:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    timer = next(v for k, v in state.items() if k.startswith("Timer"))
    return float(timer["time_elapsed"]["train"])


def run_cell(data: str, family: str, size: str, root: Path, seed: int) -> dict:
    run_dir = root / data / f"{family}_{size}"
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        num_train = "null" if size == "full" else size
        cmd = [
            sys.executable,
            "-m",
            "lightning_diff.cli.train",
            *EXPERIMENTS[data][family],
            f"data.num_train={num_train}",
            f"run_dir={run_dir}",
            f"seed={seed}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "+callbacks.timer._target_=lightning.pytorch.callbacks.Timer",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{data} {family} {size}: {time.perf_counter() - start:.0f} s in all", file=sys.stderr)
    metrics = json.loads(metrics_path.read_text())
    return {
        "family": family,
        "size": size,
        "train_s": train_seconds(run_dir / "checkpoints" / "last.ckpt"),
        "quality": metrics.get(QUALITY[data], float("nan")),
        "quality_train": metrics.get(QUALITY[data] + ("_train" if data == "moons" else "_heldout")),
        "memorized": metrics.get("eval/memorized_fraction", float("nan")),
        "steps": metrics.get("step"),
    }


def table(data: str, rows: list[dict]) -> str:
    ref = "sliced W2 of training data" if data == "moons" else "held-out data FD"
    metric = QUALITY[data].split("/")[1]
    lines = [
        f"| family | num_train | steps | training time (s) | {metric} | {ref} | memorized |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ref_value = "" if r["quality_train"] is None else f"{r['quality_train']:.3f}"
        lines.append(
            f"| {r['family']} | {r['size']} | {r['steps']} | {r['train_s']:.0f} | {r['quality']:.3f} | "
            f"{ref_value} | {r['memorized']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--data", choices=sorted(EXPERIMENTS), default="moons")
    parser.add_argument("--sizes", nargs="+", default=["32", "128", "512", "full"])
    parser.add_argument("--families", nargs="+", default=list(EXPERIMENTS["moons"]))
    parser.add_argument("--root", type=Path, default=Path("runs/families"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [
        run_cell(args.data, family, size, args.root, args.seed)
        for size in args.sizes
        for family in args.families
    ]
    out = table(args.data, rows)
    (args.root / args.data / "table.md").write_text(out + "\n")
    print(out)


if __name__ == "__main__":
    main()
