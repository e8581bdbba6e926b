"""Kernel WPO vs DDPM vs score SDE across training-set sizes and seeds, scored against held-out data.

Each (data, family, size, seed) cell is one ``ld-train`` run of the family's experiment with
``data.num_train=size``, ``seed=seed`` and a fixed step budget, in
``runs/families/<data>/<family>_<size>_seed<seed>``. Training wall time is Lightning's ``Timer``
callback (the ``train`` stage only), read from the last checkpoint; the metrics are the run's
``metrics.json``: held-out Frechet distance at equal size with its floor, the data-copying statistic
C_T, the NN1 ratio to held-out data, k-NN precision/recall and the 1/3-ratio memorized fraction.

Beside the families, the adversaries a claim has to beat, scored by the same evaluation on the same
splits and seeds without any training:

- ``copies``: the training subset itself, sampled with replacement (a copy machine);
- ``noisy_copies``: the same plus Gaussian noise (0.2 per pixel for digits, 0.1 for moons);
- ``kde``: a plain Gaussian kernel density on the training subset (Scott's bandwidth);
- ``kde_loo``: the kernel density at the kernel family's own isotropic optimum (the width of one
  shared isotropic kernel minimising the leave-one-out objective, where ``model=kernel_wpo`` starts),
  sampled exactly: the member of its family that every fitted kernel model has to beat.

Every ``kernel_wpo`` run is scored twice: with its experiment's sampler (DDIM) and with
``sampler=exact`` (its mixture drawn directly), the second as the row ``kernel_wpo_exact``. The
objective columns are the family's leave-one-out objective on held-out points (``val/loss``): where
the run starts (the isotropic optimum) and where it ends.

Cells already done are reused, so the script can be stopped and restarted; ``--jobs 2`` runs two
trainings at once with one thread each; ``--reevaluate`` scores finished runs again through ``ld-eval``
(same samples) when the evaluation has changed since they trained.

    .venv/bin/python bench/families.py --data moons --sizes 32 128 512 --seeds 0 1 2 --jobs 2
    .venv/bin/python bench/families.py --data digits --sizes 32 --seeds 0 1 2 --jobs 2

Prints a Markdown table of mean +- standard deviation over seeds (and writes it with every cell as
JSON lines to ``runs/families/<data>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
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
        "kernel_wpo_fit0.01": ["experiment=digits_kernel_wpo", "model.fit_sigma=0.01"],
        "kernel_wpo_fit0.05": ["experiment=digits_kernel_wpo", "model.fit_sigma=0.05"],
        "kernel_wpo_fit0.2": ["experiment=digits_kernel_wpo", "model.fit_sigma=0.2"],
    },
}
ADVERSARIES = ("copies", "noisy_copies", "kde", "kde_loo")
NOISE = {"moons": 0.1, "digits": 0.2}
SPACE = {"moons": "raw", "digits": "digits_cnn"}
EVALUATION_SEED = 12345  # conf/callback/evaluation.yaml
FIT_SIGMA = {"moons": 0.01, "digits": 0.1}  # model.fit_sigma of each data set's kernel experiment
COLUMNS = ("quality", "floor", "copying_ct", "nn1_ratio", "precision", "recall", "memorized", "val_objective")


def train_seconds(ckpt: Path) -> float:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    timer = next(v for k, v in state.items() if k.startswith("Timer"))
    return float(timer["time_elapsed"]["train"])


def summary(data: str, metrics: dict) -> dict:
    space = SPACE[data]
    get = lambda key: metrics.get(f"eval/{key}", metrics.get(key, math.nan))  # noqa: E731
    return {
        "quality": get(f"fd_{space}_vs_heldout"),
        "floor": get(f"fd_{space}_vs_heldout_floor"),
        "ci": (get(f"fd_{space}_vs_heldout_ci_low"), get(f"fd_{space}_vs_heldout_ci_high")),
        "copying_ct": get("data_copying_ct"),
        "nn1_ratio": get("nn1_ratio_to_heldout"),
        "precision": get(f"precision_{space}"),
        "recall": get(f"recall_{space}"),
        "memorized": get("memorized_fraction"),
    }


def reevaluate(run_dir: Path, num_samples: int, sampler: str | None = None) -> dict:
    """``ld-eval`` of the run's last checkpoint with the evaluation's own samples (sample seed and
    sampler as in training, or ``sampler``), cached in ``metrics_eval[_<sampler>].json``: metrics
    added or fixed after the run trained, or another sampler, without training again."""
    out = run_dir / (f"metrics_eval_{sampler}.json" if sampler else "metrics_eval.json")
    if not out.is_file():
        cmd = [
            sys.executable,
            "-m",
            "lightning_diff.cli.evaluate",
            f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"num_samples={num_samples}",
            f"out={out}",
            *([f"sampler={sampler}"] if sampler else []),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return json.loads(out.read_text())


def train_run(data: str, family: str, size: str, seed: int, run_dir: Path, *extra: str) -> None:
    """``ld-train`` of the family's experiment on ``size`` training points (one thread, CSV logger,
    Lightning's Timer), with ``extra`` overrides; ``bench/`` is importable for bench callbacks."""
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
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}"}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def run_cell(data: str, family: str, size: str, seed: int, root: Path, again: bool = False) -> dict:
    run_dir = root / data / f"{family}_{size}_seed{seed}"
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        start = time.perf_counter()
        train_run(data, family, size, seed, run_dir)
        print(f"{data} {family} {size} seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    metrics = json.loads(metrics_path.read_text())
    if again:
        metrics.update(reevaluate(run_dir, int(metrics["num_samples"])))
    row = {"family": family, "size": size, "seed": seed, "steps": metrics.get("step")}
    row["train_s"] = train_seconds(run_dir / "checkpoints" / "last.ckpt")
    row.update(summary(data, metrics))
    row["val_objective"] = last_val_loss(run_dir) if family == "kernel_wpo" else math.nan
    rows = [row]
    if family.startswith("kernel_wpo"):
        exact = {**metrics, **reevaluate(run_dir, int(metrics["num_samples"]), sampler="exact")}
        rows.append({**row, "family": f"{family}_exact", **summary(data, exact)})
    return rows


def last_val_loss(run_dir: Path) -> float:
    """The held-out objective of the weights the run ended on (the CSV logger's ``metrics.csv``):
    ``val/loss_best`` when BestWeights restored the best validation, else the last ``val/loss``."""
    import csv

    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    best = [r["val/loss_best"] for r in rows if r.get("val/loss_best")]
    values = best or [r["val/loss"] for r in rows if r.get("val/loss")]
    return float(values[-1]) if values else math.nan


def datamodule(data: str, size: str, seed: int):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_diff.cli import CONF_DIR

    num_train = "null" if size == "full" else size
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}", f"data.num_train={num_train}", f"seed={seed}"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm


def adversary_cell(data: str, name: str, size: str, seed: int, num_samples: int) -> dict:
    """An adversary's samples from the training subset, scored like a family's."""
    from lightning_diff.diffusion.kernel_bandwidth import isotropic_objective, isotropic_optimum
    from lightning_diff.diffusion.kernel_score import KernelScore, scott_bandwidth
    from lightning_diff.metrics.pipeline import evaluate_samples

    dm = datamodule(data, size, seed)
    train = dm.train_tensor()
    gen = torch.Generator().manual_seed(1000 + seed)
    picks = train[torch.randint(len(train), (num_samples,), generator=gen)]
    if name == "copies":
        samples = picks
    elif name == "noisy_copies":
        samples = picks + NOISE[data] * torch.randn(picks.shape, generator=gen)
    elif name == "kde":
        bandwidth = float(scott_bandwidth(train.reshape(len(train), -1).double()))
        samples = picks + bandwidth * torch.randn(picks.shape, generator=gen)
    flat = train.reshape(len(train), -1).double()
    objective = math.nan
    if name == "kde_loo":  # where model=kernel_wpo starts, with its fit_sigma and data range
        width, _ = isotropic_optimum(flat, flat, sigma=FIT_SIGMA[data])
        kernel = KernelScore(flat, "isotropic", bandwidth=width, tied=True)
        samples = (
            kernel.sample_exact((num_samples, flat.shape[1]), gen)
            .float()
            .reshape(num_samples, *train.shape[1:])
        )
        samples = samples.clamp(-1, 1) if data == "digits" else samples
        objective = isotropic_objective(flat, dm.val_tensor(), width, FIT_SIGMA[data])
    # The training callback's metric seed, so the adversaries' held-out draws and floors are the runs'.
    values, _ = evaluate_samples(samples, dm, seed=EVALUATION_SEED)
    row = {"family": name, "size": size, "seed": seed, "steps": 0, "train_s": 0.0}
    row.update(summary(data, values))
    row["val_objective"] = objective
    return row


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    mean = float(np.mean(finite))
    digits = 3 if abs(mean) < 10 else 1
    if len(finite) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} +- {float(np.std(finite, ddof=1)):.{digits}f}"


def table(data: str, rows: list[dict]) -> str:
    metric = f"fd_{SPACE[data]}_vs_heldout"
    header = (
        f"| family | num_train | seeds | training time (s) | {metric} | floor | C_T | NN1 ratio to held-out "
        "| precision | recall | memorized | held-out objective |"
    )
    lines = [header, "| " + " | ".join(["---"] * 12) + " |"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["family"]), []).append(r)
    for (size, family), cell in groups.items():
        seeds = len(cell)
        cols = [mean_std([r[c] for r in cell]) for c in COLUMNS]
        train_s = mean_std([r["train_s"] for r in cell]) if family not in ADVERSARIES else "-"
        lines.append(f"| {family} | {size} | {seeds} | {train_s} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--data", choices=sorted(EXPERIMENTS), default="moons")
    parser.add_argument("--sizes", nargs="+", default=["32", "128", "512"])
    parser.add_argument("--families", nargs="+", default=list(EXPERIMENTS["moons"]))
    parser.add_argument("--adversaries", nargs="*", default=list(ADVERSARIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs/families"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--reevaluate", action="store_true", help="score finished runs again with ld-eval (metrics_eval.json)"
    )
    args = parser.parse_args()
    cells = [(f, s, k) for s in args.sizes for f in args.families for k in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = [
            r
            for rs in pool.map(lambda c: run_cell(args.data, *c, args.root, args.reevaluate), cells)
            for r in rs
        ]
    num_samples = 2000 if args.data == "moons" else 500
    rows += [
        adversary_cell(args.data, name, size, seed, num_samples)
        for size in args.sizes
        for name in args.adversaries
        for seed in args.seeds
    ]
    out_dir = args.root / args.data
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "cells.jsonl", "w") as handle:
        for r in rows:
            handle.write(json.dumps(r) + "\n")
    rows.sort(key=lambda r: (int(r["size"]) if r["size"] != "full" else 10**9, r["family"]))
    out = table(args.data, rows)
    (out_dir / "table.md").write_text(out + "\n")
    for size in args.sizes:
        frontier([r for r in rows if r["size"] == size], out_dir / f"frontier_{size}.png", args.data, size)
    print(out)


def frontier(rows: list[dict], path: Path, data: str, size: str) -> None:
    """Held-out FD against C_T, one point per row (mean +- standard deviation over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for family in sorted({r["family"] for r in rows}):
        cell = [r for r in rows if r["family"] == family]
        x = np.array([r["copying_ct"] for r in cell], dtype=float)
        y = np.array([r["quality"] for r in cell], dtype=float)
        sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
        ax.errorbar(x.mean(), y.mean(), xerr=sd(x), yerr=sd(y), marker="o", capsize=3, label=family)
    floor = np.mean([r["floor"] for r in rows])
    ax.axhline(floor, color="grey", ls=":", lw=1, label="floor")
    ax.axvline(-3, color="red", ls="--", lw=1, label="C_T = -3 (copying)")
    ax.set_xlabel("data-copying statistic C_T (negative: closer to the training set)")
    ax.set_ylabel(f"fd_{SPACE[data]}_vs_heldout")
    ax.set_title(f"{data}, {size} training points, mean +- sd over seeds")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
