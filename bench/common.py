"""Helpers shared by the benchmark scripts: ``key=value`` arguments, timing, Markdown tables."""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def parse_args(argv: Sequence[str], defaults: dict[str, Any], doc: str | None) -> dict[str, Any]:
    """``key=value`` arguments over ``defaults`` (Hydra-style); each value takes its default's type.

    ``--help`` (or ``-h``) prints ``doc`` and the defaults, then exits. Lists are comma-separated;
    ``none``/``null`` give None.
    """
    if any(a in ("-h", "--help") for a in argv):
        print((doc or "").strip() + "\n\narguments (key=value), with their defaults:")
        for key, value in defaults.items():
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            print(f"  {key}={shown}")
        sys.exit(0)
    args = dict(defaults)
    for item in argv:
        if "=" not in item:
            sys.exit(f"error: argument {item!r} is not key=value (see --help)")
        key, raw = item.split("=", 1)
        if key not in defaults:
            sys.exit(f"error: unknown argument {key!r}; known: {', '.join(defaults)}")
        args[key] = _convert(raw, defaults[key])
    return args


def _convert(raw: str, default: Any) -> Any:
    if raw.lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, (list, tuple)):
        kind = type(default[0]) if default else str
        return [kind(v) for v in raw.split(",") if v]
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def machine_line() -> str:
    """One line naming the machine: CPU or GPU, torch version, thread count."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return f"{device}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Seconds one call of ``fn(*args, **kwargs)`` takes (device work included)."""
    sync()
    start = time.perf_counter()
    fn(*args, **kwargs)
    sync()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): cost ~ x^slope."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    den = sum((a - mx) ** 2 for a in lx)
    return num / den


def array_run_overrides(path, model: Sequence[str], steps: int, seed: int) -> list[str]:
    """``ld-train`` overrides for a ``.npy`` file of a user's data: the model's own overrides, ``steps``
    steps on the CPU, a CSV log and no progress bar; everything else at its default."""
    return [
        "data=array",
        f"data.path={path}",
        *model,
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"seed={seed}",
    ]
