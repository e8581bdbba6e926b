"""Analytical teleportation (Wang & Vastola 2024) against the skip fraction, over seeds, against the
plain sampler at the same number of model evaluations.

    .venv/bin/python bench/teleport.py ckpts=a.ckpt,b.ckpt,c.ckpt num_samples=500 out=runs/teleport/digits

For each checkpoint (one per training seed) and skip fraction (0 to 80% of a 50-step DDIM grid by
default), the first steps are replaced by the closed-form flow of the training set's Gaussian and the
model runs the rest of the grid; beside it, plain DDIM with as many steps as teleportation used model
evaluations (``plain``), so a saving is only claimed where it beats spending the same budget the
plain way. The hand-over level is reported in data scales: ``sigma_skip / sqrt(lambda_max)``, with
``lambda_max`` the top eigenvalue of the training set's covariance (kept in the checkpoint).

Every row draws sample ``i`` from seed ``(12345, i)`` and is scored by ``evaluate_samples``: the held-out
Frechet distance at equal size (``fd_<space>_vs_heldout``), the Frechet distance to the training set at
the full sample size (less noisy), C_T and the sliced Wasserstein distance to the held-out split.
The paired columns take differences of the training-set FD within each checkpoint (the same model and
sample seeds), so the spread between models cancels: the change from skip 0, and teleportation minus
the plain sampler at the same number of evaluations.
Writes ``cells.jsonl``, ``table.md`` (mean +- standard deviation over the checkpoints) and
``teleport.png`` to ``out``; cells already in ``cells.jsonl`` are reused.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from common import machine_line, parse_args
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_diff.checkpoints import load_model
from lightning_diff.cli import CONF_DIR
from lightning_diff.generation import generate
from lightning_diff.metrics.pipeline import evaluate_samples

DEFAULTS = {
    "ckpts": [""],
    "num_samples": 500,
    "grid": 50,
    "skips": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "out": "runs/teleport",
    "seed": 12345,
}


def sampler(name: str, steps: int, skip: float | None = None):
    overrides = [f"sampler={name}", f"sampler.num_steps={steps}"]
    if skip is not None:
        overrides.append(f"sampler.skip_fraction={skip}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return instantiate(compose("eval", overrides=overrides).sampler)


def cell(model, datamodule, kind: str, steps: int, skip: float, args: dict) -> dict:
    shape = tuple(datamodule.data_shape)
    chosen = sampler("teleport_ddim", steps, skip) if kind == "teleport" else sampler("ddim", steps)
    n = args["num_samples"]
    samples, nfe = generate(model, range(n), shape, chosen, seed=args["seed"], batch_size=n)
    metrics, _ = evaluate_samples(samples, datamodule, kid=False, cache_dir=Path(".cache/lightning_diff"))
    key = next(k for k in metrics if k.startswith("fd_") and k.endswith("_vs_heldout"))
    row = {"kind": kind, "steps": steps, "skip": skip, "nfe": nfe}
    row.update(
        heldout_fd=metrics[key],
        floor=metrics[key + "_floor"],
        train_fd=metrics[key.removesuffix("_vs_heldout")],
        copying_ct=metrics["data_copying_ct"],
        sliced_w2=metrics["sliced_wasserstein"],
    )
    if kind == "teleport":
        sigmas = model.schedule.sampling_sigmas(steps, chosen.inner.spacing)
        handover = float(sigmas[chosen.skip_index(sigmas)])
        scale = math.sqrt(float(torch.linalg.eigvalsh(model.gaussian_cov.double()).max()))
        row.update(sigma_skip=handover, data_scale=scale, saved=chosen.saved_nfe)
    return row


def mean_std(values) -> str:
    values = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(values):
        return "-"
    digits = 3 if abs(values.mean()) < 10 else 1
    if len(values) == 1:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} +- {values.std(ddof=1):.{digits}f}"


def report(rows: list[dict], out: Path) -> str:
    skips = sorted({r["skip"] for r in rows if r["kind"] == "teleport"})
    lines = [
        "| skip | sigma_skip / data scale | NFE used | held-out FD: teleport | held-out FD: plain DDIM, "
        "same NFE | training-set FD: teleport | training-set FD: plain | change from skip 0 (paired) "
        "| teleport - plain (paired) | C_T: teleport | sliced W2: teleport | plain |",
        "| " + " | ".join(["---"] * 12) + " |",
    ]
    start = {r["ckpt"]: r["train_fd"] for r in rows if r["kind"] == "teleport" and r["skip"] == 0.0}
    series = {"teleport": [], "plain": []}
    for skip in skips:
        tele = [r for r in rows if r["kind"] == "teleport" and r["skip"] == skip]
        nfe = tele[0]["nfe"]
        plain = [r for r in rows if r["kind"] == "plain" and r["steps"] == nfe]
        ratio = [r["sigma_skip"] / r["data_scale"] for r in tele]
        by_ckpt = {r["ckpt"]: r["train_fd"] for r in plain}
        change = [r["train_fd"] - start[r["ckpt"]] for r in tele if r["ckpt"] in start]
        versus = [r["train_fd"] - by_ckpt[r["ckpt"]] for r in tele if r["ckpt"] in by_ckpt]
        lines.append(
            f"| {skip:.0%} | {mean_std(ratio)} | {nfe} | {mean_std(r['heldout_fd'] for r in tele)} | "
            f"{mean_std(r['heldout_fd'] for r in plain)} | {mean_std(r['train_fd'] for r in tele)} | "
            f"{mean_std(r['train_fd'] for r in plain)} | {mean_std(change)} | {mean_std(versus)} | "
            f"{mean_std(r['copying_ct'] for r in tele)} | "
            f"{mean_std(r['sliced_w2'] for r in tele)} | {mean_std(r['sliced_w2'] for r in plain)} |"
        )
        for kind, group in (("teleport", tele), ("plain", plain)):
            values = [r["train_fd"] for r in group]
            series[kind].append(
                (nfe, float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0)
            )
    floor = mean_std(r["floor"] for r in rows)
    lines.append(f"\nHeld-out floor (training points against the same held-out points): {floor}.")
    figure(series, out / "teleport.png")
    return "\n".join(lines)


def figure(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, points in series.items():
        points = sorted(points)
        x, y, e = zip(*points, strict=True)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"{kind}")
    ax.set_xlabel("model evaluations per sample")
    ax.set_ylabel("Frechet distance to the training set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / "cells.jsonl"
    done = [json.loads(line) for line in cells_path.read_text().splitlines()] if cells_path.is_file() else []
    rows = list(done)
    print(
        f"{len(args['ckpts'])} checkpoints, {args['num_samples']} samples; {machine_line()}", file=sys.stderr
    )
    for ckpt in args["ckpts"]:
        model, run_cfg = load_model(ckpt, "cuda" if torch.cuda.is_available() else "cpu")
        datamodule = instantiate(run_cfg.data)
        datamodule.setup("fit")
        todo = [("teleport", args["grid"], s) for s in args["skips"]]
        for skip in args["skips"]:  # the plain sampler at each teleport row's number of evaluations
            steps = args["grid"] - round(skip * args["grid"])
            todo.append(("plain", steps, 0.0))
        for kind, steps, skip in todo:
            if any(
                r["ckpt"] == ckpt and r["kind"] == kind and r["steps"] == steps and r["skip"] == skip
                for r in rows
            ):
                continue
            row = {"ckpt": ckpt, **cell(model, datamodule, kind, steps, skip, args)}
            rows.append(row)
            with open(cells_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), file=sys.stderr)
    table = report(rows, out)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
