"""``ld-compare RUN_DIR... [--metrics a,b] [--out DIR]``: compare finished runs from their directories.

Works offline from what ``ld-train`` leaves in each run directory: ``config.yaml`` (flattened to
dotted keys), ``metrics.json`` (the latest evaluation) and ``csv/metrics.csv`` (every logged scalar
against the step). Writes to ``--out`` (default ``compare/``):

- ``compare.md``: the config keys whose values differ between the runs, and each run's final metrics;
- ``compare.csv``: the same rows (``section,key,<run>,...``);
- ``<metric>.png`` for each chosen metric: its curve against the step, one line per run;
- ``frontier.png`` when runs report both: held-out quality (``eval/fd_<space>_vs_heldout`` with its
  bootstrap interval, and the floor a perfect model reaches) against the data-copying statistic
  (``eval/data_copying_ct``; below -3: copying), one point per run, so that a memorization study
  reads as a trade-off: a model may only buy quality by moving left.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_diff.cli import entry_point
from lightning_diff.errors import ConfigError

NOT_CURVES = {"epoch", "step"}
MAX_DEFAULT_PLOTS = 12


@dataclass
class Run:
    path: Path
    label: str
    config: dict[str, Any]
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay values)."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def find_csv(run_dir: Path) -> Path | None:
    """The CSV log: ``csv/metrics.csv``, else the newest ``csv/<version>/metrics.csv``."""
    direct = run_dir / "csv" / "metrics.csv"
    if direct.is_file():
        return direct
    versions = sorted((run_dir / "csv").glob("*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return versions[-1] if versions else None


def read_curves(path: Path | None) -> dict[str, list[tuple[int, float]]]:
    """Each column of a CSVLogger file as ``[(step, value), ...]`` in step order, empty cells skipped."""
    curves: dict[str, list[tuple[int, float]]] = {}
    if path is None:
        return curves
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = _number(row.get("step", ""))
            if step is None:
                continue
            for column, text in row.items():
                value = _number(text)
                if column not in NOT_CURVES and value is not None:
                    curves.setdefault(column, []).append((int(step), value))
    for points in curves.values():
        points.sort(key=lambda point: point[0])
    return curves


def load_run(path: str | Path) -> Run:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist: pass directories written by ld-train")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: pass run directories written by ld-train")
    config = flatten(OmegaConf.to_container(OmegaConf.load(config_path), resolve=False))
    curves = read_curves(find_csv(run_dir))
    final = {name: points[-1][1] for name, points in curves.items()}
    steps = [step for points in curves.values() for step, _ in points]
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        saved = json.loads(metrics_path.read_text())
        final.update({k: float(v) for k, v in saved.items() if isinstance(v, (int, float))})
    elif steps:
        final["step"] = float(max(steps))
    return Run(run_dir, run_dir.name, config, final, curves)


def label_runs(runs: list[Run]) -> None:
    """Column names: the directory names, or the paths below the common parent when names repeat."""
    names = [run.path.name for run in runs]
    if len(set(names)) == len(names):
        return
    resolved = [str(run.path.resolve()) for run in runs]
    parent = os.path.commonpath(resolved) if len(runs) > 1 else str(Path(resolved[0]).parent)
    for run, full in zip(runs, resolved, strict=True):
        run.label = os.path.relpath(full, parent) if full != parent else run.path.name


def _inside_run_dir(value: Any, run: Run) -> bool:
    run_dir = str(run.config.get("run_dir", ""))
    return bool(run_dir) and isinstance(value, str) and value.startswith(run_dir)


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between runs; paths inside each run's own directory are left
    out (they differ for every pair of runs), ``run_dir`` itself is kept."""
    keys = sorted({key for run in runs for key in run.config})
    missing = object()
    out = []
    for key in keys:
        values = [run.config.get(key, missing) for run in runs]
        if all(repr(v) == repr(values[0]) for v in values):
            continue
        if key != "run_dir" and all(_inside_run_dir(v, run) for v, run in zip(values, runs, strict=True)):
            continue
        out.append(key)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def table_rows(runs: list[Run]) -> list[tuple[str, str, list[str]]]:
    """``(section, key, cells)`` rows: differing config keys, then the final metrics of any run."""
    rows = []
    for key in differing_keys(runs):
        rows.append(("config", key, [_cell(run.config[key]) if key in run.config else "-" for run in runs]))
    metric_names = sorted({name for run in runs for name in run.final})
    for name in metric_names:
        rows.append(("metric", name, [_cell(run.final[name]) if name in run.final else "-" for run in runs]))
    return rows


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def write_markdown(path: Path, runs: list[Run], rows: list[tuple[str, str, list[str]]]) -> None:
    header = "| key | " + " | ".join(_md_escape(run.label) for run in runs) + " |"
    rule = "| --- |" + " --- |" * len(runs)
    lines = ["# Run comparison", ""]
    lines += [f"- `{run.label}`: {run.path}" for run in runs]
    for section, title in (("config", "Config keys that differ"), ("metric", "Final metrics")):
        lines += ["", f"## {title}", ""]
        body = [r for r in rows if r[0] == section]
        if not body:
            lines.append("(none)" if section == "metric" else "(the runs have the same config)")
            continue
        lines += [header, rule]
        lines += [
            f"| {_md_escape(key)} | " + " | ".join(_md_escape(c) for c in cells) + " |"
            for _, key, cells in body
        ]
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, runs: list[Run], rows: list[tuple[str, str, list[str]]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["section", "key", *(run.label for run in runs)])
        for section, key, cells in rows:
            writer.writerow([section, key, *cells])


def default_metrics(runs: list[Run]) -> list[str]:
    """``train/loss`` first, then every curve logged at two or more steps in at least two runs (in
    the one run when there is only one)."""
    needed = min(2, len(runs))
    counts: dict[str, int] = {}
    for run in runs:
        for name, points in run.curves.items():
            if len(points) >= 2:
                counts[name] = counts.get(name, 0) + 1
    chosen = sorted(name for name, count in counts.items() if count >= needed)
    if "train/loss" in chosen:
        chosen.remove("train/loss")
        chosen.insert(0, "train/loss")
    return chosen[:MAX_DEFAULT_PLOTS]


def plot_metric(path: Path, metric: str, runs: list[Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        points = run.curves.get(metric)
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=run.label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COPYING_KEY = "eval/data_copying_ct"


def heldout_quality_key(runs: list[Run]) -> str | None:
    """The held-out Frechet distance the runs report (``eval/fd_<space>_vs_heldout``), if any."""
    keys = sorted(
        {k for run in runs for k in run.final if k.startswith("eval/fd_") and k.endswith("_vs_heldout")}
    )
    return keys[0] if keys else None


def plot_frontier(path: Path, runs: list[Run]) -> Path | None:
    """Held-out quality against the data-copying statistic, one point per run; None when no run
    reports both."""
    quality = heldout_quality_key(runs)
    points = [
        run
        for run in runs
        if quality is not None
        and all(
            isinstance(run.final.get(k), (int, float)) and math.isfinite(run.final[k])
            for k in (quality, COPYING_KEY)
        )
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for run in points:
        x, y = run.final[COPYING_KEY], run.final[quality]
        low, high = run.final.get(f"{quality}_ci_low"), run.final.get(f"{quality}_ci_high")
        yerr = [[y - low], [high - y]] if low is not None and high is not None else None
        ax.errorbar([x], [y], yerr=yerr, fmt="o", capsize=3, label=run.label)
    floors = [run.final[f"{quality}_floor"] for run in points if f"{quality}_floor" in run.final]
    if floors:
        ax.axhline(
            float(sum(floors) / len(floors)), color="gray", linestyle=":", label="floor (training data)"
        )
    ax.axvline(-3.0, color="tab:red", linestyle="--", label="copying below")
    ax.set_xlabel("data-copying C_T (below 0: closer to the training set than fresh data)")
    ax.set_ylabel(quality.removeprefix("eval/") + " (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(
    run_dirs: list[str | Path], out: str | Path = "compare", metrics: list[str] | None = None
) -> dict:
    """Load the runs, write ``compare.md``, ``compare.csv`` and one PNG per metric to ``out``;
    returns ``{"markdown": path, "csv": path, "plots": [paths], "differing": [keys]}``."""
    runs = [load_run(path) for path in run_dirs]
    label_runs(runs)
    if metrics:
        logged = sorted({name for run in runs for name in run.curves})
        for metric in metrics:
            if not any(metric in run.curves for run in runs):
                available = ", ".join(logged) or "(none)"
                raise ConfigError(f"metric {metric} is in no run's csv/metrics.csv: pick from {available}")
    chosen = metrics if metrics else default_metrics(runs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    write_markdown(out_dir / "compare.md", runs, rows)
    write_csv(out_dir / "compare.csv", runs, rows)
    plots = []
    for metric in chosen:
        path = out_dir / (metric.replace("/", "_") + ".png")
        plot_metric(path, metric, runs)
        plots.append(path)
    frontier = plot_frontier(out_dir / "frontier.png", runs)
    if frontier is not None:
        plots.append(frontier)
    return {
        "markdown": out_dir / "compare.md",
        "csv": out_dir / "compare.csv",
        "plots": plots,
        "differing": differing_keys(runs),
        "frontier": frontier,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ld-compare",
        description="Compare ld-train run directories: differing config keys, final metrics, curves.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by ld-train")
    parser.add_argument(
        "--metrics",
        default=None,
        help="comma-separated CSV columns to plot against the step (default: train/loss and "
        "every curve that several runs logged)",
    )
    parser.add_argument("--out", default="compare", help="output folder (default: compare/)")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    result = compare(args.run_dirs, args.out, metrics)
    print(f"wrote {result['markdown']} and {result['csv']}")
    for path in result["plots"]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
