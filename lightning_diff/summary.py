"""The lines a run ends with: where its outputs are and what its evaluation says.

``ld-train``, ``ld-sample`` and ``ld-eval`` finish with :func:`run_summary`: the run directory, the
checkpoint, the latest sample grid and the metrics file, the metrics as a table (held-out comparisons
first, each with its interval and floor on the same row) and, for an offline wandb run, the
``wandb sync`` command that uploads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

#: Keys folded into the row of the metric they qualify (``fd_raw_vs_heldout_ci_low``: its interval).
QUALIFIERS = ("_ci_low", "_ci_high", "_floor")


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def metrics_table(metrics: Mapping[str, float], prefix: str = "eval/") -> list[str]:
    """Rows ``name  value  [low, high]  floor`` of the numeric ``prefix`` keys: held-out comparisons
    (``*_vs_heldout*``) first, then the rest in name order; ``prefix`` is dropped from the names."""
    values = {
        k.removeprefix(prefix): float(v)
        for k, v in metrics.items()
        if k.startswith(prefix) and isinstance(v, int | float) and not isinstance(v, bool)
    }
    rows: dict[str, dict[str, float]] = {}
    for key, value in values.items():
        base = next((key.removesuffix(q) for q in QUALIFIERS if key.endswith(q)), key)
        if base != key and base in values:
            rows.setdefault(base, {})[key[len(base) :]] = value
        else:
            rows.setdefault(key, {})["value"] = value
    order = sorted(rows, key=lambda k: ("_vs_heldout" not in k, k))
    width = max((len(k) for k in order), default=6)
    lines = [f"{'metric':<{width}}  {'value':>10}  {'95% interval':<22}  floor"]
    for key in order:
        row = rows[key]
        interval = ""
        if "_ci_low" in row and "_ci_high" in row:
            interval = f"[{_number(row['_ci_low'])}, {_number(row['_ci_high'])}]"
        floor = _number(row["_floor"]) if "_floor" in row else ""
        row_text = f"{key:<{width}}  {_number(row.get('value', math.nan)):>10}  {interval:<22}  {floor}"
        lines.append(row_text.rstrip())
    return lines


def latest_file(folder: Path, pattern: str) -> Path | None:
    """The most recently written file of ``folder`` matching ``pattern``, or None."""
    found = [p for p in Path(folder).glob(pattern) if p.is_file()] if Path(folder).is_dir() else []
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def wandb_line(run_dir: Path, run_id: str | None, url: str | None = None) -> str | None:
    """Where the run is on wandb: its page when it ran online, else the ``wandb sync`` command for
    every offline folder of its id (a resumed run adds a folder per process start); None without any."""
    if url:
        return url
    folder = Path(run_dir) / "wandb"
    pattern = f"offline-run-*-{run_id}" if run_id else "offline-run-*"
    if not folder.is_dir() or not any(p.is_dir() for p in folder.glob(pattern)):
        return None
    return f"offline; upload with: wandb sync {folder / pattern}"


def run_summary(
    title: str,
    paths: Mapping[str, Path | str | None],
    metrics: Mapping[str, float] | None = None,
    wandb: str | None = None,
) -> str:
    """The summary block: ``title``, one line per given path (``paths``: label -> path), the ``wandb``
    line (:func:`wandb_line`) and the metrics table."""
    lines = [title]
    shown = {label: path for label, path in {**paths, "wandb": wandb}.items() if path is not None}
    width = max((len(label) for label in shown), default=0)
    for label, path in shown.items():
        lines.append(f"  {label:<{width}}  {path}")
    if metrics:
        lines.append("")
        lines.extend("  " + row for row in metrics_table(metrics))
    return "\n".join(lines)
