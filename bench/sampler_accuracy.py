"""The sampler's own error: every sampler on every family's schedule, driven by the exact denoiser.

    .venv/bin/python bench/sampler_accuracy.py                 # both targets, the full grid
    .venv/bin/python bench/sampler_accuracy.py targets=2d quick=true

With the closed-form denoiser of a Gaussian N(mu, C) (``GaussianDenoiser``) the only errors left
are the sampler's (discretisation, and the prior's mismatch with the true marginal at the largest
sigma), so the distribution of its output can be compared with the target exactly. Two targets:

- ``2d``: mean (1, -0.5), covariance with eigenvalues 1 and 0.05 rotated by 0.5 rad;
- ``digits``: the mean and covariance of the 1617 training digits (d = 64, ``DigitsDataModule``,
  val_fraction 0.1, seed 0; eigenvalues from 2.8 down to 0, three of them zero).

Schedules are each family's default: DDPM's linear T = 1000 ``DiscreteSchedule``, ``VPSDE``,
``SubVPSDE`` and ``VESDE`` (sigma 0.01 to 50), as in ``conf/model``. Per cell it prints the model
evaluations per sample, the relative covariance error ``||C_hat - C||_F / ||C||_F`` and the mean
error ``||m_hat - mu|| / sqrt(tr C)`` of the sampler's output distribution, against the noise
floor: the root-mean-square of the same statistics for ``n_floor`` (4000) fresh samples of the
true Gaussian, ``sqrt(((tr C)^2 + ||C||_F^2) / (n - 1)) / ||C||_F`` and ``1 / sqrt(n)`` (Wishart
moments; checked by simulation at the top of the output).

How each cell is computed (column ``method``):

- ``exact``: with a Gaussian denoiser a step of DDIM, Heun, ancestral sampling or Euler-Maruyama
  is affine in the state and in its fresh noise, ``x' = A x + b + S n``. Each step is run through
  the sampler's own code on the two-level grid ``[sigma_i, sigma_(i+1)]``, once on the rows
  ``m, m + e_1, ..., m + e_d`` with zero noise (giving ``A m + b`` and ``A``) and once on ``m``
  with the noise rows ``0, e_1, ..., e_d`` (giving ``S``); then ``m' = A m + b`` and
  ``P' = A P A^T + S S^T``, from the prior ``N(0, prior_std^2 I)``. No sampling error at all.
- ``mc``: Monte Carlo with ``n_mc`` samples for the samplers that are not affine: the
  predictor-corrector's Langevin step size depends on the batch's norms, and the adaptive ODE
  solver picks its steps per sample. For the adaptive ODE the exact flow of the same inputs is
  used as a control variate (its output moments are known in closed form), which removes nearly
  all of the Monte Carlo error; for PC the table gives the Monte Carlo floor of ``n_mc`` samples.

What it does not show: a learned denoiser's own error, which adds to these numbers.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import machine_line, parse_args, table
from torch import Tensor

from lightning_diff.diffusion import (
    VESDE,
    VPSDE,
    DiscreteSchedule,
    GaussianDenoiser,
    SampleGenerators,
    SubVPSDE,
    sample_ancestral,
    sample_ddim,
    sample_euler_maruyama,
    sample_heun,
    sample_ode_adaptive,
    sample_pc,
)

DEFAULTS = {
    "targets": ["2d", "digits"],
    "families": ["ddpm", "vp", "subvp", "ve"],
    "samplers": ["ddim", "heun", "ancestral", "euler_maruyama", "pc", "ode", "ode_1e-3"],
    "n_floor": 4000,
    "n_mc_2d": 50000,
    "n_mc_digits": 10000,
    "n_mc_ode": 10000,  # the adaptive ODE's cells (control variate: far less Monte Carlo error)
    "quick": False,  # fewer step counts and no Monte Carlo cells
    "threads": 1,
    "seed": 0,
}

FAMILIES: dict[str, tuple[Callable[[], object], tuple[str, ...]]] = {
    "ddpm": (DiscreteSchedule, ("leading", "trailing", "linspace", "karras", "vp")),
    "vp": (VPSDE, ("uniform", "karras", "vp")),
    "subvp": (SubVPSDE, ("uniform", "karras", "vp")),
    "ve": (functools.partial(VESDE, sigma_min=0.01, sigma_max=50.0), ("uniform", "karras", "vp")),
}

# sampler name -> (function, step counts, quick step counts, how its moments are computed)
SAMPLERS: dict[str, tuple[Callable, tuple[int, ...], tuple[int, ...], str]] = {
    "ddim": (functools.partial(sample_ddim, eta=0.0), (10, 25, 50, 100, 250), (25, 50, 100), "exact"),
    "heun": (sample_heun, (10, 18, 25, 35, 50), (18, 25, 35), "exact"),
    "ancestral": (
        functools.partial(sample_ancestral, variance="posterior"),
        (50, 100, 250, 1000),
        (100, 1000),
        "exact",
    ),
    "euler_maruyama": (sample_euler_maruyama, (50, 100, 250, 1000), (100, 1000), "exact"),
    "pc": (sample_pc, (100, 1000), (), "mc"),
    "ode": (sample_ode_adaptive, (1000,), (), "mc"),  # rtol = atol = 1e-5, as conf/sampler/ode.yaml
    "ode_1e-3": (functools.partial(sample_ode_adaptive, rtol=1e-3, atol=1e-3), (1000,), (), "mc"),
}
# Monte Carlo cells run on the config's own spacing only (conf/sampler/pc.yaml, ode.yaml).
MC_SPACING = {"pc": {"ddpm": "linspace"}, "ode": {"ddpm": "leading"}, "ode_1e-3": {"ddpm": "leading"}}


@dataclass
class Target:
    name: str
    mean: Tensor
    cov: Tensor

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def errors(self, mean: Tensor, cov: Tensor) -> tuple[float, float]:
        """(relative covariance error, mean error over the data scale sqrt(tr C))."""
        rel_cov = torch.linalg.norm(cov - self.cov) / torch.linalg.norm(self.cov)
        rel_mean = torch.linalg.norm(mean - self.mean) / self.cov.trace().sqrt()
        return float(rel_cov), float(rel_mean)

    def floor(self, n: int) -> tuple[float, float]:
        """RMS of the same statistics for n fresh samples (unbiased sample covariance)."""
        tr, fro = float(self.cov.trace()), float(torch.linalg.norm(self.cov))
        return math.sqrt((tr**2 + fro**2) / (n - 1)) / fro, 1 / math.sqrt(n)


def gaussian_2d() -> Target:
    c, s = math.cos(0.5), math.sin(0.5)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([1.0, 0.05], dtype=torch.float64)) @ rot.T
    return Target("2d", torch.tensor([1.0, -0.5], dtype=torch.float64), cov)


def gaussian_digits() -> Target:
    from lightning_diff.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, val_fraction=0.1, seed=0)
    dm.setup("fit")
    x = dm.train_tensor().reshape(len(dm.train_tensor()), -1).double()
    return Target("digits", x.mean(0), torch.cov(x.T, correction=0))


class _Noise(SampleGenerators):
    """Hands a sampler prescribed noise instead of random numbers: zeros, or the rows ``0, e_1, ..., e_d``
    (for a batch of ``d + 1``) once per step; a second draw within one step is refused."""

    def __init__(self, dim: int, probe: bool):
        self.dim, self.probe, self.draws = dim, probe, 0
        self.generators = [None] * (dim + 1)

    def randn(self, shape, device=None, dtype=None) -> Tensor:
        self.draws += 1
        if self.draws > 1 and self.probe:
            raise RuntimeError("the sampler drew noise twice in one step: its moments are not propagated")
        rows = torch.eye(self.dim, dtype=torch.float64) if self.probe else torch.zeros(self.dim, self.dim)
        return torch.cat([torch.zeros(1, self.dim), rows]).to(dtype=torch.float64).reshape(shape)


def exact_moments(
    fn: Callable, denoiser, sigmas: Tensor, prior_std: float, dim: int
) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the sampler's output, propagated step by step through its own code."""
    mean = torch.zeros(dim, dtype=torch.float64)
    cov = prior_std**2 * torch.eye(dim, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        grid = sigmas[i : i + 2]
        rows = torch.cat([mean[None], mean + eye])
        out, _ = fn(denoiser, rows, grid, generator=_Noise(dim, probe=False))
        a = (out[1:] - out[0]).T  # column j: A e_j
        out_noise, _ = fn(
            denoiser, mean.expand(dim + 1, dim).clone(), grid, generator=_Noise(dim, probe=True)
        )
        s = (out_noise[1:] - out_noise[0]).T
        mean, cov = out[0], a @ cov @ a.T + s @ s.T
    return mean, cov


def reference_flow(
    target: Target, sigma0: float, sigma_end: float
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The exact probability-flow map from ``sigma0`` to ``sigma_end`` followed by ``D(., sigma_end)``
    (what an exact ODE solver with a final denoising step returns), as ``(matrix, map)``."""
    lam, vec = torch.linalg.eigh(target.cov)
    lam = lam.clamp(min=0)
    flow = ((lam + sigma_end**2) / (lam + sigma0**2)).sqrt()
    gain = lam / (lam + sigma_end**2) if sigma_end > 0 else torch.ones_like(lam)
    matrix = vec @ torch.diag(flow * gain) @ vec.T

    def apply(x: Tensor) -> Tensor:
        return target.mean + (x - target.mean) @ matrix.T

    return matrix, apply


def mc_moments(
    name: str, fn: Callable, denoiser, target: Target, sigmas: Tensor, prior_std: float, n: int, seed: int
) -> tuple[Tensor, Tensor, int]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, target.dim, generator=generator, dtype=torch.float64) * prior_std
    out, nfe = fn(denoiser, x0, sigmas, generator=generator)
    if not name.startswith("ode"):
        return out.mean(0), torch.cov(out.T), nfe
    # Control variate: the exact flow of the same inputs, whose output moments are known.
    nonzero = sigmas[sigmas > 0]
    matrix, apply = reference_flow(target, float(nonzero[0]), float(nonzero[-1]))
    ref = apply(x0)
    ref_mean = target.mean - matrix @ target.mean  # E[x0] = 0
    ref_cov = prior_std**2 * matrix @ matrix.T
    mean = ref_mean + out.mean(0) - ref.mean(0)
    cov = ref_cov + torch.cov(out.T) - torch.cov(ref.T)
    return mean, cov, nfe


def floor_check(target: Target, n: int, repeats: int = 200, seed: int = 1) -> tuple[float, float]:
    """The floor by simulation: RMS of the statistics over ``repeats`` draws of n true samples."""
    generator = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(target.cov + 1e-12 * torch.eye(target.dim, dtype=torch.float64))
    cov_errs, mean_errs = [], []
    for _ in range(repeats):
        x = target.mean + torch.randn(n, target.dim, generator=generator, dtype=torch.float64) @ chol.T
        c, m = target.errors(x.mean(0), torch.cov(x.T))
        cov_errs.append(c**2)
        mean_errs.append(m**2)
    return math.sqrt(sum(cov_errs) / repeats), math.sqrt(sum(mean_errs) / repeats)


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    torch.set_num_threads(args["threads"])
    makers = {"2d": gaussian_2d, "digits": gaussian_digits}
    print(f"{machine_line()}\n")
    for target_name in args["targets"]:
        target = makers[target_name]()
        denoiser = GaussianDenoiser(target.mean, target.cov)
        floor_cov, floor_mean = target.floor(args["n_floor"])
        sim_cov, sim_mean = floor_check(target, args["n_floor"])
        n_mc = args[f"n_mc_{target_name}"]
        print(
            f"## target {target_name} (d = {target.dim}); noise floor of n = {args['n_floor']} true "
            f"samples: covariance {floor_cov:.4f} (simulated {sim_cov:.4f}), mean {floor_mean:.4f} "
            f"(simulated {sim_mean:.4f}); Monte Carlo cells use {n_mc} samples for PC (their own "
            f"covariance floor: {target.floor(n_mc)[0]:.4f}) and {args['n_mc_ode']} for the adaptive "
            "ODE (with its control variate)\n"
        )
        header = [
            "family",
            "sampler",
            "spacing",
            "steps",
            "NFE",
            "cov err",
            "mean err",
            "cov < floor",
            "method",
        ]
        print(table(header, []), flush=True)
        cells: list[list] = []
        start = time.perf_counter()
        for family in args["families"]:
            make, spacings = FAMILIES[family]
            schedule = make()
            for sampler_name in args["samplers"]:
                fn, steps, quick_steps, method = SAMPLERS[sampler_name]
                if method == "mc" and args["quick"]:
                    continue
                for spacing in spacings:
                    if method == "mc" and spacing != MC_SPACING[sampler_name].get(family, "uniform"):
                        continue
                    for k in quick_steps if args["quick"] else steps:
                        sigmas = schedule.sampling_sigmas(k, spacing)
                        prior = float(schedule.prior_std(sigmas[0]))
                        label = method
                        if method == "exact":
                            mean, cov = exact_moments(fn, denoiser, sigmas, prior, target.dim)
                            _, nfe = fn(denoiser, torch.zeros(1, target.dim, dtype=torch.float64), sigmas)
                        else:
                            n = args["n_mc_ode"] if sampler_name.startswith("ode") else n_mc
                            mean, cov, nfe = mc_moments(
                                sampler_name, fn, denoiser, target, sigmas, prior, n, args["seed"]
                            )
                            label = f"mc {n}"
                        cov_err, mean_err = target.errors(mean, cov)
                        below = "yes" if cov_err < floor_cov else "no"
                        row = [
                            family,
                            sampler_name,
                            spacing,
                            k,
                            nfe,
                            f"{cov_err:.4f}",
                            f"{mean_err:.4f}",
                            below,
                        ]
                        print("| " + " | ".join(str(c) for c in [*row, label]) + " |", flush=True)
                        cells.append(row)
        print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)
        print(f"### {target_name}: covariance error / mean error (model evaluations), by family\n")
        print(pivot(cells, args["families"]) + "\n", flush=True)


def pivot(cells: list[list], families: list[str]) -> str:
    """The rows of ``main`` as one line per (sampler, steps, spacing) and one column per family.
    On the score SDEs the DDPM spacings leading, trailing and linspace all mean ``uniform``, which
    is shown beside DDPM's ``leading``."""
    by_key: dict[tuple, dict[str, str]] = {}
    for family, sampler, spacing, steps, nfe, cov_err, mean_err, _ in cells:
        shown = "leading / uniform" if spacing in ("leading", "uniform") else spacing
        cell = f"{cov_err} / {mean_err} ({nfe})"
        by_key.setdefault((sampler, int(steps), shown), {})[family] = cell
    order = {name: i for i, name in enumerate(SAMPLERS)}
    spacing_order = ["leading / uniform", "trailing", "linspace", "karras", "vp"]
    keys = sorted(by_key, key=lambda k: (order[k[0]], spacing_order.index(k[2]), k[1]))
    rows = [[s, k, sp, *(by_key[(s, k, sp)].get(f, "-") for f in families)] for s, k, sp in keys]
    return table(["sampler", "steps", "spacing", *families], rows)


if __name__ == "__main__":
    main(sys.argv[1:])
