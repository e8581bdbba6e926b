"""What ``ld-tv`` reports from its rows (:mod:`lightning_diff.tv_study`): the slopes and ratios of
the README's table (:func:`summarise`) and the three figures (:func:`figures`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def slope(x: list[float], y: list[float]) -> dict[str, float] | None:
    """Least-squares slope of ``log y`` on ``log x`` with a 95% interval (t quantile); None below 3 points."""
    from scipy import stats

    pts = [(a, b) for a, b in zip(x, y, strict=False) if a > 0 and b is not None and b > 0]
    if len(pts) < 3:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    fit = stats.linregress(lx, ly)
    half = stats.t.ppf(0.975, len(pts) - 2) * fit.stderr
    return {
        "slope": float(fit.slope),
        "low": float(fit.slope - half),
        "high": float(fit.slope + half),
        "points": len(pts),
    }


def summarise(rows: list[dict], reference: dict[str, Any], fit_steps_from: int) -> dict[str, Any]:
    """The README's numbers: per sampler the slope of TV against the step size (at the reference
    error and horizon, ``steps >= fit_steps_from``), against epsilon (errors > 0 at the reference
    steps) and the TV at each horizon; the largest ratio of bound to TV."""
    ref_e, ref_h, ref_n = (
        float(reference["score_error"]),
        float(reference["horizon"]),
        int(reference["steps"]),
    )
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == name]
        by_steps = sorted(
            (
                r
                for r in mine
                if r["score_error"] == ref_e and r["horizon"] == ref_h and r["steps"] >= fit_steps_from
            ),
            key=lambda r: r["steps"],
        )
        by_error = sorted(
            (r for r in mine if r["steps"] == ref_n and r["horizon"] == ref_h and r["score_error"] > 0),
            key=lambda r: r["score_error"],
        )
        by_horizon = sorted(
            (r for r in mine if r["steps"] == ref_n and r["score_error"] == ref_e), key=lambda r: r["horizon"]
        )
        ratios = [r["bound"] / r["tv"] for r in mine if r.get("bound") is not None and r["tv"] > 0]
        out[name] = {
            "step_size_slope": slope([1 / r["steps"] for r in by_steps], [r["tv"] for r in by_steps]),
            "score_error_slope": slope([r["score_error"] for r in by_error], [r["tv"] for r in by_error]),
            "horizon": [(r["ou_horizon"], r["tv"]) for r in by_horizon],
            "bound_over_tv": (min(ratios), max(ratios)) if ratios else None,
        }
    return out


def figures(rows: list[dict], reference: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """TV against steps, against epsilon and against the OU horizon, one line per sampler (bounds dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref_e, ref_h, ref_n = (
        float(reference["score_error"]),
        float(reference["horizon"]),
        int(reference["steps"]),
    )
    panels = [
        (
            "steps",
            "number of steps",
            lambda r: r["score_error"] == ref_e and r["horizon"] == ref_h,
            lambda r: r["steps"],
        ),
        (
            "score_error",
            "score error epsilon (RMS per coordinate)",
            lambda r: r["steps"] == ref_n and r["horizon"] == ref_h and r["score_error"] > 0,
            lambda r: r["score_error"],
        ),
        (
            "horizon",
            "forward horizon T (OU time)",
            lambda r: r["steps"] == ref_n and r["score_error"] == ref_e,
            lambda r: r["ou_horizon"],
        ),
    ]
    paths = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for key, label, keep, xval in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = floor_drawn = False
        for i, name in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
            pts = sorted((xval(r), r) for r in rows if r["sampler"] == name and keep(r))
            if len(pts) < 2:
                continue
            drawn = True
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1]["tv"] for p in pts], marker="o", color=colours[i % len(colours)], label=name)
            if pts[0][1].get("tv_floor") is not None:
                label = None if floor_drawn else "histogram floor (exact draws)"
                ax.plot(xs, [p[1]["tv_floor"] for p in pts], ls=":", color="grey", label=label)
                floor_drawn = True
            bounds = [p[1].get("bound") for p in pts]
            if all(b is not None for b in bounds):
                ax.plot(xs, bounds, ls="--", color=colours[i % len(colours)], label=f"{name} bound")
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log" if key != "horizon" else "linear")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("total variation to the data")
        ax.legend(fontsize="x-small")
        fig.tight_layout()
        path = out_dir / f"{stem}_tv_vs_{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
