"""Sampling cost of the kernel WPO model per sample as the number of centres grows: ``sampler=exact``
(pick a centre, draw its Gaussian) against DDIM, whose every step sums over all centres.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kernel_sampling_cost.py

Random centres in 2-D (full precisions from an untrained precision field) and 64-D (rank-8 low-rank
precisions), 1000 samples, the median of 3 timings. Prints a Markdown table of milliseconds per
sample.
"""

from __future__ import annotations

import sys
import time

import torch
from common import machine_line, parse_args

from lightning_diff.diffusion.exact import ExactSampler
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.diffusion.samplers import Sampler, sample_ddim
from lightning_diff.models.kernel_wpo import KernelWPO
from lightning_diff.nets.precision import PrecisionField

DEFAULTS = {
    "centers": [100, 1000, 10000],
    "dims": [2, 64],
    "num_samples": 1000,
    "ddim_steps": 50,
    "repeats": 3,
}


def model(num_centers: int, dim: int) -> KernelWPO:
    form = {"form": "full"} if dim <= 8 else {"form": "lowrank", "rank": 8}
    field = PrecisionField((dim,), **form)
    kernel = KernelWPO(field, bandwidth=0.3)
    kernel.fit_data(torch.randn(num_centers, dim, generator=torch.Generator().manual_seed(0)))
    return kernel


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    n = args["num_samples"]
    print(f"{machine_line()}; {n} samples, median of {args['repeats']}\n")
    print(f"| dim | centres | exact (ms / sample) | DDIM {args['ddim_steps']} steps (ms / sample) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    ddim = Sampler(sample_ddim, args["ddim_steps"])
    for dim in args["dims"]:
        for m in args["centers"]:
            kernel = model(m, dim)
            shape = (dim,)

            def draw(chosen, k=kernel, shape=shape):
                return k.sample(n, shape, chosen, SampleGenerators(range(n), seed=0), use_ema=False)

            exact = seconds(lambda: draw(ExactSampler()), args["repeats"])
            flow = seconds(lambda: draw(ddim), 1)
            print(
                f"| {dim} | {m} | {1e3 * exact / n:.4f} | {1e3 * flow / n:.3f} | {flow / exact:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
