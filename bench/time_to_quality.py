"""Training time each family needs to reach a held-out quality, scored along its training curve.

Each (data, family, seed) run is ``ld-train`` of the family's experiment (``bench/families.py``'s
``EXPERIMENTS``) with checkpoints at the start of training and at about log-spaced steps; every
checkpoint is then scored, in this process, by the evaluation the runs use at their end (its sampler
and sample seed, ``--num-samples`` samples, the held-out Frechet distance at equal size and the
data-copying statistic C_T). The clock is Lightning's ``Timer`` callback (the ``train`` stage), read
from each checkpoint: it counts the optimiser steps, validation (which BestWeights needs) and the
writing of checkpoints, not the scoring done here afterwards. The kernel family's 1-D bandwidth search
runs before the train stage and is timed apart (``setup_s``).

A family reaches a target when a checkpoint's held-out FD is at most the target; the table gives the
first such time per seed (mean +- sd over the seeds that reached it, and how many did), and the
figure the whole curves.

    .venv/bin/python bench/time_to_quality.py --data moons --size 512 --seeds 0 1 2 --jobs 2
    .venv/bin/python bench/time_to_quality.py --data digits --size full --seeds 0 1 2 --jobs 2

Writes ``runs/time_to_quality/<data>_<size>/curves.jsonl``, ``table.md`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import EVALUATION_SEED, FIT_SIGMA, mean_std, summary, train_run, train_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEURAL = (10, 20, 50, 100, 200, 500, 1000, 2000, 3000)
CURVE_STEPS = {  # where each family's curve is scored: the start, then about log-spaced steps
    "moons": {"ddpm": NEURAL, "score_sde": NEURAL, "kernel_wpo": (5, 10, 20, 50, 100, 200, 300)},
    "digits": {"ddpm": NEURAL, "score_sde": NEURAL, "kernel_wpo": (5, 10, 20, 50, 100, 200, 300)},
}
TARGETS = {"moons": (0.05, 0.02, 0.01, 0.005), "digits": (150.0, 120.0, 100.0)}


class CurveCheckpoints(L.Callback):
    """Writes ``curve<step>.ckpt`` when training starts (step 0: for the kernel family, its isotropic
    start) and after each listed step."""

    def __init__(self, dirpath: str, steps: list[int]):
        self.dirpath, self.steps = Path(dirpath), {int(s) for s in steps}

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.dirpath / "curve0000000.ckpt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.dirpath / f"curve{trainer.global_step:07d}.ckpt")


def train(data: str, family: str, size: str, seed: int, run_dir: Path) -> None:
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return
    steps = ",".join(map(str, CURVE_STEPS[data][family]))
    start = time.perf_counter()
    train_run(
        data,
        family,
        size,
        seed,
        run_dir,
        "+callbacks.curve._target_=time_to_quality.CurveCheckpoints",
        f"+callbacks.curve.dirpath={run_dir / 'checkpoints'}",
        f"+callbacks.curve.steps=[{steps}]",
    )
    print(f"{data} {family} seed {seed}: trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def setup_seconds(data: str, size: str, seed: int) -> float:
    """Wall time of the kernel family's start: the isotropic optimum of its objective."""
    from families import datamodule

    from lightning_diff.diffusion.kernel_bandwidth import isotropic_optimum

    flat = datamodule(data, size, seed).train_tensor()
    flat = flat.reshape(len(flat), -1).double()
    start = time.perf_counter()
    isotropic_optimum(flat, flat, sigma=FIT_SIGMA[data])
    return time.perf_counter() - start


def curve(data: str, family: str, size: str, seed: int, run_dir: Path, num_samples: int) -> list[dict]:
    """Score every checkpoint of a run (cached per checkpoint in ``curve/``)."""
    from hydra.utils import instantiate

    from lightning_diff.checkpoints import load_model
    from lightning_diff.generation import generate
    from lightning_diff.metrics.pipeline import evaluate_samples

    torch.set_num_threads(1)
    rows, dm = [], None
    ckpts = sorted((run_dir / "checkpoints").glob("curve*.ckpt")) + [run_dir / "checkpoints" / "last.ckpt"]
    for ckpt in ckpts:
        cached = run_dir / "curve" / f"{ckpt.stem}_{num_samples}.json"
        if not cached.is_file():
            model, cfg = load_model(ckpt)
            if dm is None:
                dm = instantiate(cfg.data)
                dm.setup("fit")
            samples, _ = generate(model, range(num_samples), tuple(dm.data_shape), None, EVALUATION_SEED, 500)
            values, _ = evaluate_samples(samples, dm, seed=EVALUATION_SEED)
            cached.parent.mkdir(exist_ok=True)
            cached.write_text(json.dumps({"step": model.global_step_loaded, **values}))
        values = json.loads(cached.read_text())
        row = {"family": family, "seed": seed, "step": values["step"], "train_s": train_seconds(ckpt)}
        row["last"] = ckpt.name == "last.ckpt"  # the weights the run ends on (BestWeights's, where used)
        row.update(
            {k: v for k, v in summary(data, values).items() if k in ("quality", "floor", "copying_ct")}
        )
        rows.append(row)
    # last.ckpt is written after the end-of-training callbacks (the final evaluation): its weights
    # exist when the last step ends, so it takes that step's time.
    rows[-1]["train_s"] = max(r["train_s"] for r in rows[:-1])
    return rows


def first_time(rows: list[dict], target: float) -> float:
    hits = [
        r["train_s"] for r in sorted(rows, key=lambda r: (r["train_s"], r["last"])) if r["quality"] <= target
    ]
    return hits[0] if hits else math.nan


def table(data: str, rows: list[dict], targets: tuple[float, ...], setup: dict[int, float]) -> str:
    head = " | ".join(f"time to FD <= {t:g} (s)" for t in targets)
    lines = [
        f"| family | seeds | {head} | best FD on the curve | FD at the end (last.ckpt) | C_T at the end "
        "| total train time (s) |",
        "| " + " | ".join(["---"] * (6 + len(targets))) + " |",
    ]
    for family in sorted({r["family"] for r in rows}):
        runs = {}
        for r in rows:
            if r["family"] == family:
                runs.setdefault(r["seed"], []).append(r)
        cols = []
        for t in targets:
            times = [first_time(run, t) for run in runs.values()]
            reached = [x for x in times if math.isfinite(x)]
            cols.append(f"{mean_std(reached)} ({len(reached)}/{len(times)})")
        ends = [next(r for r in run if r["last"]) for run in runs.values()]
        best = [min(r["quality"] for r in run) for run in runs.values()]
        lines.append(
            f"| {family} | {len(runs)} | "
            + " | ".join(cols)
            + f" | {mean_std(best)} | {mean_std([e['quality'] for e in ends])}"
            f" | {mean_std([e['copying_ct'] for e in ends])} | {mean_std([e['train_s'] for e in ends])} |"
        )
    if setup:
        lines.append("")
        lines.append(
            f"kernel_wpo's isotropic start (before the train stage): {mean_std(list(setup.values()))} s"
        )
    return "\n".join(lines)


def figure(data: str, size: str, rows: list[dict], targets: tuple[float, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = dict(zip(sorted({r["family"] for r in rows}), palette, strict=False))
    for (family, seed), run in sorted(group(rows).items()):
        run = sorted((r for r in run if not r["last"]), key=lambda r: r["step"])
        x = np.array([max(r["train_s"], 0.1) for r in run])
        ax.plot(
            x,
            [r["quality"] for r in run],
            marker=".",
            color=colours[family],
            label=family if seed == min(s for f, s in group(rows) if f == family) else None,
        )
    for t in targets:
        ax.axhline(t, color="grey", ls=":", lw=1)
    floor = np.mean([r["floor"] for r in rows])
    ax.axhline(floor, color="black", ls="--", lw=1, label=f"floor {floor:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training time (s, Lightning Timer; start plotted at 0.1 s)")
    ax.set_ylabel(f"held-out FD ({data})")
    ax.set_title(f"{data}, {size} training points: quality along training, one line per seed")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        out.setdefault((r["family"], r["seed"]), []).append(r)
    return out


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--data", choices=sorted(CURVE_STEPS), default="moons")
    parser.add_argument("--size", default="512")
    parser.add_argument("--families", nargs="+", default=["ddpm", "score_sde", "kernel_wpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", type=float, default=None)
    parser.add_argument("--num-samples", type=int, default=None, help="default: 2000 (moons), 500 (digits)")
    parser.add_argument("--root", type=Path, default=Path("runs/time_to_quality"))
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    targets = tuple(args.targets or TARGETS[args.data])
    num_samples = args.num_samples or (2000 if args.data == "moons" else 500)
    out_dir = (args.root / f"{args.data}_{args.size}").resolve()
    cells = [(f, s) for f in args.families for s in args.seeds]

    def one(cell):
        family, seed = cell
        run_dir = out_dir / f"{family}_seed{seed}"
        train(args.data, family, args.size, seed, run_dir)
        return curve(args.data, family, args.size, seed, run_dir, num_samples)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = [r for rs in pool.map(one, cells) for r in rs]
    setup = {}
    if "kernel_wpo" in args.families:
        torch.set_num_threads(1)
        setup = {s: setup_seconds(args.data, args.size, s) for s in args.seeds}
    with open(out_dir / "curves.jsonl", "w") as handle:
        for r in rows:
            handle.write(json.dumps(r) + "\n")
    out = table(args.data, rows, targets, setup)
    (out_dir / "table.md").write_text(out + "\n")
    figure(args.data, args.size, rows, targets, out_dir / "curves.png")
    print(out)


if __name__ == "__main__":
    main()
