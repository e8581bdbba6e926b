"""The Gaussian-score findings of Wang & Vastola 2024 (arXiv 2412.09726), over training and seeds.

    .venv/bin/python bench/deviation.py runs=runs/deviation/seed0,runs/deviation/seed1,runs/deviation/seed2

Reads the ``deviation/<reference>/sigma_<level>`` series that ``callbacks=with_deviation`` logged to
each run's CSV logger (``experiment=digits_gaussian_score``: 8 log-spaced steps, 256 training points,
the per-sample mean of the explained variance) and the data scale ``sqrt(lambda_max)`` of the training
covariance kept in the run's checkpoint. Prints, with mean +- standard deviation over the runs:

- the Gaussian deviation at every logged step for a few noise levels;
- signature 1: EV > 0.99 (deviation < 0.01) at every sigma above the data scale, at the last step;
- signature 2: the deviation at moderate sigma (between 0.1 and 1 data scale) is not monotone over
  training (its minimum over steps comes before the last step, by more than the seed spread);
- signature 3: at small sigma (below 0.1 data scales) the mixture reference explains the model at
  least as well as the empirical (training-set) score: deviation from the mixture <= from empirical.

Writes ``deviation.md`` and ``deviation.png`` (deviation against sigma, one line per step, mean over
runs; and the deviation over steps at 0.1, 0.4, 1 and 3 data scales) to ``out``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch
from common import parse_args

DEFAULTS = {"runs": [""], "out": "runs/deviation"}


def series(run: Path, prefix: str = "deviation") -> tuple[list[int], list[float], dict[str, np.ndarray]]:
    """Steps, sigmas and per reference an array (steps, sigmas) of one run's logged deviations."""
    with open(run / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(f"{prefix}/gaussian/mean")]
    keys = [k for k in rows[0] if k.startswith(f"{prefix}/") and "/sigma_" in k]
    refs = sorted({k.split("/")[1] for k in keys})
    sigmas = sorted({float(k.rsplit("sigma_", 1)[1]) for k in keys})
    steps = [int(r["step"]) for r in rows]
    out = {}
    for ref in refs:
        out[ref] = np.array([[float(r[f"{prefix}/{ref}/sigma_{s:.3g}"]) for s in sigmas] for r in rows])
    return steps, sigmas, out


def data_scale(run: Path) -> float:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    return math.sqrt(float(torch.linalg.eigvalsh(state["gaussian_cov"].double()).max()))


def ms(values) -> str:
    values = np.asarray(values, dtype=float)
    fmt = (lambda v: f"{v:.2g}") if np.abs(values).max() < 0.01 else (lambda v: f"{v:.3f}")
    return f"{fmt(values.mean())} +- {fmt(values.std(ddof=1))}" if len(values) > 1 else fmt(values.mean())


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    runs = [Path(r) for r in args["runs"]]
    loaded = [series(r) for r in runs]
    steps, sigmas = loaded[0][0], np.array(loaded[0][1])
    if any(s != steps for s, _, _ in loaded):
        sys.exit("error: the runs logged the deviation at different steps")
    dev = {ref: np.stack([d[ref] for _, _, d in loaded]) for ref in loaded[0][2]}  # (runs, steps, sigmas)
    scale = float(np.mean([data_scale(r) for r in runs]))
    lines = [f"{len(runs)} runs; data scale sqrt(lambda_max) = {scale:.3f}\n"]
    shown = [j for j, s in enumerate(sigmas) if j % 3 == 0 or j == len(sigmas) - 1]
    lines.append("| step | " + " | ".join(f"sigma {sigmas[j]:.3g}" for j in shown) + " |")
    lines.append("| --- " * (len(shown) + 1) + "|")
    for k, step in enumerate(steps):
        lines.append(f"| {step} | " + " | ".join(ms(dev["gaussian"][:, k, j]) for j in shown) + " |")
    high = sigmas > scale
    last_high = dev["gaussian"][:, -1, high]
    ok1 = bool((last_high < 0.01).all())
    lines.append(
        f"\nSignature 1 (EV > 0.99 above the data scale, last step): {'holds' if ok1 else 'fails'}; largest "
        f"deviation at sigma > {scale:.2f}: {last_high.max():.3g} (per run: "
        + ", ".join(f"{v:.3g}" for v in last_high.max(1))
        + ")."
    )
    moderate = (sigmas >= 0.1 * scale) & (sigmas <= scale)
    parts = []
    any_dip = False
    for j in np.nonzero(moderate)[0]:
        curve = dev["gaussian"][:, :, j]  # (runs, steps)
        mean = curve.mean(0)
        k_min = int(mean.argmin())
        rise = curve[:, -1] - curve[:, k_min]
        dip = k_min < len(steps) - 1 and rise.mean() > 2 * rise.std(ddof=1)
        any_dip |= dip
        parts.append(
            f"sigma {sigmas[j]:.3g}: minimum at step {steps[k_min]} ({ms(curve[:, k_min])}), "
            f"last {ms(curve[:, -1])}" + (" (rises after the minimum)" if dip else "")
        )
    lines.append(
        f"\nSignature 2 (non-monotone over training at moderate sigma): {'seen' if any_dip else 'not seen'}; "
        + "; ".join(parts)
        + "."
    )
    if "gmm" in dev and "empirical" in dev:
        small = sigmas < 0.1 * scale
        gmm, emp = dev["gmm"][:, -1, small], dev["empirical"][:, -1, small]
        ok3 = bool((gmm <= emp).all())
        lines.append(
            f"\nSignature 3 (mixture explains at least as well as the empirical score at sigma < "
            f"{0.1 * scale:.2g}, last step): {'holds' if ok3 else 'fails'}; "
            + "; ".join(
                f"sigma {s:.3g}: mixture {ms(g)}, empirical {ms(e)}"
                for s, g, e in zip(sigmas[small], gmm.T, emp.T, strict=True)
            )
            + "."
        )
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (out / "deviation.md").write_text(text + "\n")
    figure(steps, sigmas, dev, scale, out / "deviation.png")
    print(text)


def figure(steps, sigmas, dev, scale, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = plt.get_cmap("viridis")
    for k, step in enumerate(steps):
        left.plot(
            sigmas,
            dev["gaussian"][:, k].mean(0),
            color=cmap(k / max(1, len(steps) - 1)),
            label=f"step {step}",
        )
    left.axvline(scale, color="grey", ls="--", lw=1)
    left.set(xscale="log", yscale="log", xlabel="sigma", ylabel="1 - EV (Gaussian reference)")
    left.legend(fontsize="x-small")
    for j in sorted({int(np.abs(np.log(sigmas / (f * scale))).argmin()) for f in (0.1, 0.4, 1.0, 3.0)}):
        curve = dev["gaussian"][:, :, j]
        right.errorbar(
            steps,
            curve.mean(0),
            yerr=curve.std(0, ddof=1),
            marker="o",
            capsize=3,
            label=f"sigma {sigmas[j]:.3g}",
        )
    right.set(xscale="log", yscale="log", xlabel="training step", ylabel="1 - EV (Gaussian reference)")
    right.legend(fontsize="x-small")
    fig.suptitle("per-sample EV on training points, mean (+- sd) over runs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
