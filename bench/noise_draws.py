"""Cost of one draw of sampler noise: one generator, per-sample generators and Philox counters.

    .venv/bin/python bench/noise_draws.py
    .venv/bin/python bench/noise_draws.py batch=64,256 draws=5 repeats=3 threads=1

For each batch size ``B`` the noise of one sampler step, ``B`` samples of ``shape`` (3x32x32 by
default), is drawn by three sources, on CUDA when available and on the CPU otherwise:

* ``torch.randn``: one ``torch.Generator`` for the whole batch (a sample's noise depends on the batch);
* ``SampleGenerators``: one generator per sample, drawn row by row (one kernel per sample);
* ``CounterNoise``: Philox4x32-10 over the whole batch in one pass of torch integer ops.

The last two give every sample its own stream (the same samples whatever the batching). The sources
are built once, outside the timing, as a sampler builds them once per batch. Each repeat times
``draws`` draws in a row (after ``warmup`` draws); the table gives the median over ``repeats`` of
milliseconds per draw, the range (min-max) over repeats and what one draw per step adds to a
``steps``-step ancestral sampler (seconds per batch). Writes Markdown to stdout.
"""

from __future__ import annotations

import math
import sys

import torch
from common import machine_line, median, parse_args, table, timed

from lightning_diff.diffusion import CounterNoise, SampleGenerators

DEFAULTS = {
    "batch": [256, 1024],
    "shape": [3, 32, 32],
    "draws": 10,
    "warmup": 2,
    "repeats": 5,
    "steps": 1000,
    "threads": 0,
}


def sources(batch: int, device: str) -> dict:
    """Each source as a function drawing one batch of noise of the given shape."""
    generator = torch.Generator(device=device).manual_seed(0)
    per_sample = SampleGenerators(range(batch), seed=0, device=device)
    counters = CounterNoise(range(batch), seed=0, device=device)
    return {
        "torch.randn (one generator)": lambda shape: torch.randn(shape, generator=generator, device=device),
        "SampleGenerators": per_sample.randn,
        "CounterNoise": counters.randn,
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    row = tuple(args["shape"])
    print(
        f"{machine_line()}; device {device}; rows of shape {row} ({math.prod(row)} values); "
        f"{args['draws']} draws per timing, median of {args['repeats']}\n"
    )
    rows = []
    for batch in args["batch"]:
        shape = (batch, *row)
        base = None
        for name, draw in sources(batch, device).items():

            def run(draw=draw, shape=shape) -> None:
                for _ in range(args["draws"]):
                    draw(shape)

            for _ in range(args["warmup"]):
                draw(shape)
            per_draw = [timed(run) / args["draws"] * 1e3 for _ in range(args["repeats"])]
            ms = median(per_draw)
            base = base or ms
            rows.append(
                [
                    name,
                    batch,
                    f"{ms:.3f}",
                    f"{min(per_draw):.3f}-{max(per_draw):.3f}",
                    f"{ms / base:.2f}",
                    f"{ms * args['steps'] / 1e3:.2f}",
                ]
            )
            print("  ".join(map(str, rows[-1])), flush=True)
    header = [
        "source",
        "batch",
        "ms / draw (median)",
        "range",
        "x torch.randn",
        f"s per {args['steps']}-step ancestral run",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
