"""Cost of the evaluation metrics and of the kernel WPO score as the number of points grows.

    .venv/bin/python bench/metrics.py                       # every part at CPU sizes
    .venv/bin/python bench/metrics.py parts=nn nn_sizes=50000 nn_dims=3072    # the GPU row

Parts (``parts=nn,frechet,kernel,topk``):

* ``nn``: the memorization metric's nearest-neighbour search
  (:func:`~lightning_diff.metrics.distances.nearest_neighbours`, k = 2, what ``Memorization.update``
  runs) with N generated = N training samples, for each N of ``nn_sizes`` and dimension of ``nn_dims``;
* ``frechet``: ``FrechetDistance`` statistics (``update`` of the real and generated sides, then
  ``compute``) for ``fd_samples`` samples of each ``fd_dims`` feature dimension;
* ``kernel``: :class:`~lightning_diff.diffusion.kernel_score.KernelScore` ``score`` of ``kernel_queries``
  queries at sigma = ``sigma`` against N centres (``kernel_sizes``), dimensions ``kernel_dims``,
  exact and with ``top_k`` = ``kernel_topk``;
* ``topk``: the relative L2 error ``||s_k - s|| / ||s||`` of the top-k score against the exact one for
  each k of ``topk_ks``, at ``topk_sigmas``, N = ``topk_n``.

Each cost table ends with the least-squares slope of log(seconds) against log(N): cost ~ N^slope.
Times are medians of ``repeats``; data are standard Gaussian (the cost does not depend on them).
"""

from __future__ import annotations

import copy
import sys

import torch
from common import loglog_slope, machine_line, median, parse_args, table, timed

from lightning_diff.diffusion.kernel_score import KernelScore
from lightning_diff.metrics.distances import nearest_neighbours
from lightning_diff.metrics.frechet import FrechetDistance

DEFAULTS = {
    "parts": ["nn", "frechet", "kernel", "topk"],
    "nn_sizes": [1000, 2000, 4000, 8000],
    "nn_dims": [64, 3072],
    "fd_samples": 10000,
    "fd_dims": [64, 2048],
    "kernel_sizes": [500, 1000, 2000, 4000, 8000],
    "kernel_dims": [2, 64],
    "kernel_topk": 32,
    "kernel_queries": 256,
    "sigma": 0.5,
    "topk_ks": [8, 32, 128],
    "topk_sigmas": [0.1, 0.5, 2.0],
    "topk_n": 4000,
    "repeats": 3,
    "threads": 0,
}


def gaussian(n: int, d: int, seed: int, device: str, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def slope_line(sizes, seconds) -> str:
    return f"{loglog_slope(sizes, seconds):.2f}" if len(sizes) > 1 else "n/a"


def nn_part(args, device) -> None:
    print("\nNearest-neighbour search (memorization), N generated = N training, k = 2, float32:\n")
    rows = []
    for d in args["nn_dims"]:
        sizes, times = [], []
        for n in args["nn_sizes"]:
            gen, train = gaussian(n, d, 0, device), gaussian(n, d, 1, device)
            seconds = median([timed(nearest_neighbours, gen, train, k=2) for _ in range(args["repeats"])])
            sizes.append(n)
            times.append(seconds)
            rows.append([d, n, f"{seconds:.3f}", f"{n * n * d * 2 / seconds / 1e9:.1f}", ""])
        rows[-1][-1] = f"slope {slope_line(sizes, times)}"
    print(table(["dim", "N", "seconds", "GFLOP/s (2 N^2 d / s)", "log-log slope"], rows))


def frechet_part(args, device) -> None:
    print(
        f"\nFrechet statistics: update with {args['fd_samples']} real and as many generated samples, "
        "then compute (float64 sums, two eigendecompositions):\n"
    )
    rows = []
    for d in args["fd_dims"]:
        real, fake = gaussian(args["fd_samples"], d, 0, device), gaussian(args["fd_samples"], d, 1, device)
        metric = FrechetDistance(feature_dim=d).to(device)

        def update(metric: FrechetDistance, real: torch.Tensor, fake: torch.Tensor) -> None:
            metric.reset()
            for chunk in real.split(1000):
                metric.update(chunk, real=True)
            for chunk in fake.split(1000):
                metric.update(chunk, real=False)

        t_update = median([timed(update, metric, real, fake) for _ in range(args["repeats"])])
        # A Metric keeps its computed value until the next update: time fresh copies of the state.
        copies = [copy.deepcopy(metric) for _ in range(args["repeats"])]
        t_compute = median([timed(c.compute) for c in copies])
        rows.append([d, args["fd_samples"], f"{t_update:.3f}", f"{t_compute:.3f}"])
    print(table(["features", "samples per side", "update seconds", "compute seconds"], rows))


def kernel_part(args, device) -> None:
    b = args["kernel_queries"]
    print(
        f"\nKernel WPO score (KernelScore, isotropic precisions, float64): {b} queries at sigma "
        f"{args['sigma']}:\n"
    )
    rows = []
    for d in args["kernel_dims"]:
        for top_k in (None, args["kernel_topk"]):
            sizes, times = [], []
            for n in args["kernel_sizes"]:
                model = KernelScore(gaussian(n, d, 0, device, torch.float64), top_k=top_k).to(device)
                x = gaussian(b, d, 1, device, torch.float64)
                seconds = median([timed(model.score, x, args["sigma"]) for _ in range(args["repeats"])])
                sizes.append(n)
                times.append(seconds)
                rows.append([d, top_k or "exact", n, f"{1000 * seconds:.1f}", ""])
            rows[-1][-1] = f"slope {slope_line(sizes, times)}"
    print(table(["dim", "top_k", "centres N", "ms per call", "log-log slope"], rows))


def topk_part(args, device) -> None:
    n = args["topk_n"]
    print(
        f"\nTop-k truncation error of the kernel score, N = {n} centres, "
        f"{args['kernel_queries']} queries drawn from the noised data:\n"
    )
    rows = []
    for d in args["kernel_dims"]:
        train = gaussian(n, d, 0, device, torch.float64)
        exact = KernelScore(train)
        for sigma in args["topk_sigmas"]:
            x = train[: args["kernel_queries"]] + sigma * gaussian(
                args["kernel_queries"], d, 2, device, torch.float64
            )
            ref = exact.score(x, sigma)
            errors = []
            for k in args["topk_ks"]:
                approx = KernelScore(train, top_k=k).score(x, sigma)
                errors.append(f"{((approx - ref).norm() / ref.norm()).item():.2e}")
            rows.append([d, f"{exact_bandwidth(train):.3f}", sigma, *errors])
    header = ["dim", "kernel std h (Scott)", "sigma", *[f"k = {k}" for k in args["topk_ks"]]]
    print(table(header, rows))


def exact_bandwidth(train: torch.Tensor) -> float:
    from lightning_diff.diffusion.kernel_score import scott_bandwidth

    return scott_bandwidth(train)


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(machine_line() + f"; median of {args['repeats']}")
    parts = {"nn": nn_part, "frechet": frechet_part, "kernel": kernel_part, "topk": topk_part}
    for name in args["parts"]:
        parts[name](args, device)


if __name__ == "__main__":
    main(sys.argv[1:])
