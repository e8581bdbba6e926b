"""Total variation between a known density and its samplers' outputs, beside the Girsanov bound.

The study behind ``ld-tv`` (``conf/tv.yaml``; Korrapati, Baranwal & Shah 2024, ``../shared/MATH.md``).
A cell is (sampler, steps, score error ``epsilon``, horizon). Every sampler runs the data's exact
denoiser plus the error of :class:`~lightning_diff.diffusion.tv_bound.PerturbedDenoiser`, on a VP
grid whose ``beta_max`` sets the horizon.

* Gaussian data (any dimension): the output is exactly Gaussian; its mean and covariance come from
  the sampler's own code (:func:`~lightning_diff.diffusion.propagate.gaussian_output`). KL is closed
  form; TV is exact in 1-D (``tv_method: exact``) and Monte Carlo beyond (``monte_carlo``, with its
  standard error ``tv_se``).
* Mixtures (diagonal component covariances, dimension <= 3): TV between the histogram of the
  sampler's samples and the mixture's exact cell probabilities (``histogram``). Binning can only
  lower TV, and finite samples raise it: ``tv_floor`` is the same statistic for as many exact draws
  of the mixture, the level below which a cell says nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_diff.data.distributions import Gaussian, GaussianMixture
from lightning_diff.diffusion.closed_form import GaussianMixtureDenoiser
from lightning_diff.diffusion.denoisers import GaussianDenoiser
from lightning_diff.diffusion.propagate import gaussian_output
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.diffusion.sdes import VPSDE
from lightning_diff.diffusion.tv_bound import (
    BOUNDED,
    PerturbedDenoiser,
    ScoreError,
    bound_terms,
    held_score_kl,
    mc_discretisation_kl,
    mc_final_step_term,
    mc_horizon_term,
    ou_horizon,
    path_term,
    score_kl,
)
from lightning_diff.errors import ConfigError
from lightning_diff.metrics.gaussian_tv import gaussian_kl, gaussian_tv_1d, gaussian_tv_mc


@dataclass
class Cell:
    sampler: str
    steps: int
    score_error: float
    horizon: float  # beta_max of the VP schedule


def cells(design: str, samplers, steps, score_errors, horizons, reference: dict[str, Any]) -> list[Cell]:
    """``grid``: every combination. ``cross``: per sampler, the steps at the reference error and
    horizon, the errors at the reference steps and horizon, the horizons at the reference steps and
    error (duplicates dropped)."""
    if design == "grid":
        return [Cell(s, n, e, h) for s in samplers for n in steps for e in score_errors for h in horizons]
    if design != "cross":
        raise ConfigError(f"design={design!r} is not one of grid, cross")
    ref_n, ref_e, ref_h = (
        int(reference["steps"]),
        float(reference["score_error"]),
        float(reference["horizon"]),
    )
    out: list[Cell] = []
    for s in samplers:
        for cell in (
            [Cell(s, n, ref_e, ref_h) for n in steps]
            + [Cell(s, ref_n, e, ref_h) for e in score_errors]
            + [Cell(s, ref_n, ref_e, h) for h in horizons]
        ):
            if cell not in out:
                out.append(cell)
    return out


def score_error(dist: Gaussian | GaussianMixture, kind: str, seed: int) -> ScoreError:
    """The injected error's shape (``perturbation`` in ``conf/tv.yaml``) for ``dist``, normalised
    through its mean and covariance."""
    try:
        return ScoreError.named(kind, dist.mean.double(), dist.cov.double(), seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def gaussian_cell(
    dist: Gaussian,
    sampler: Sampler,
    name: str,
    cell: Cell,
    schedule: VPSDE,
    tv_options: dict,
    error: ScoreError,
) -> dict[str, Any]:
    mean, cov = dist.mean.double(), dist.cov.double()
    dim = mean.numel()
    denoiser = PerturbedDenoiser(GaussianDenoiser(mean, cov), cell.score_error, error)
    out_mean, out_cov, draws = gaussian_output(sampler, denoiser, schedule, dim)
    row: dict[str, Any] = {"draws": draws}
    if dim == 1:
        row["tv"] = gaussian_tv_1d(
            float(mean), math.sqrt(float(cov)), float(out_mean), math.sqrt(float(out_cov))
        )
        row["tv_se"], row["tv_method"] = 0.0, "exact"
    else:
        tv, se = gaussian_tv_mc(
            mean, cov, out_mean, out_cov, int(tv_options["num_samples"]), int(tv_options["seed"])
        )
        row["tv"], row["tv_se"], row["tv_method"] = tv, se, "monte_carlo"
    row["kl"] = gaussian_kl(mean, cov, out_mean, out_cov)
    sigmas = schedule.sampling_sigmas(sampler.num_steps, sampler.spacing)
    row.update(bound_terms(mean, cov, sigmas, name, cell.score_error, error))
    return row


def _histogram_edges(dist: GaussianMixture, bins: int) -> list[np.ndarray]:
    std = dist.covs.diagonal(dim1=1, dim2=2).sqrt()
    lo = (dist.means - 6 * std).min(0).values.numpy()
    hi = (dist.means + 6 * std).max(0).values.numpy()
    return [np.linspace(a, b, bins + 1) for a, b in zip(lo, hi, strict=False)]


def mixture_cell_probabilities(dist: GaussianMixture, edges: list[np.ndarray]) -> np.ndarray:
    """Exact probability of every histogram cell (diagonal components: products of 1-D masses)."""
    from scipy.special import ndtr

    probs = 0.0
    std = dist.covs.diagonal(dim1=1, dim2=2).sqrt().numpy()
    for k in range(dist.num_components):
        masses = [np.diff(ndtr((e - dist.means[k, j].item()) / std[k, j])) for j, e in enumerate(edges)]
        grid = masses[0]
        for m in masses[1:]:
            grid = np.multiply.outer(grid, m)
        probs = probs + dist.weights[k].item() * grid
    return np.asarray(probs)


def histogram_tv(freq: np.ndarray, probs: np.ndarray) -> float:
    """``1/2 sum |empirical - exact|`` over the cells of a histogram of frequencies ``freq`` (counts
    over the number of draws), with the mass outside the grid counted as one more cell."""
    outside = 1.0 - freq.sum()
    return float(0.5 * (np.abs(freq - probs).sum() + abs(outside - (1.0 - probs.sum()))))


def draw_mixture(dist: GaussianMixture):
    """``draw(n, generator)``: float64 rows of the mixture (a component by weight, then its Gaussian)."""

    def draw(n: int, generator: torch.Generator) -> Tensor:
        component = torch.multinomial(dist.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, dist.dim, generator=generator, dtype=torch.float64)
        return dist.means[component] + torch.einsum("nij,nj->ni", dist.chols[component], z)

    return draw


def noisy_mixture_log_prob(dist: GaussianMixture, sigma: float):
    """``log p_sigma``: the mixture with ``sigma^2 I`` added to every component's covariance."""
    covs = dist.covs.double() + sigma**2 * torch.eye(dist.dim, dtype=torch.float64)
    comps = torch.distributions.MultivariateNormal(dist.means.double(), covariance_matrix=covs)
    log_w = dist.weights.double().log()
    return lambda x: torch.logsumexp(log_w + comps.log_prob(x.double()[:, None]), dim=1)


def mixture_bound_terms(
    dist: GaussianMixture,
    denoiser: PerturbedDenoiser,
    sigmas: Tensor,
    scheme: str,
    cell: Cell,
    tv_options: dict,
) -> dict[str, Any]:
    """The terms of :func:`~lightning_diff.diffusion.tv_bound.bound_terms` for a mixture, by Monte Carlo
    (``tv.bound_samples`` draws per term and per quadrature node), each with its standard error;
    ``bound_se`` combines them to first order. The last step's Jacobian is that of ``denoiser`` with
    its error (a positive definite ``ScoreError.matrix`` keeps the step one to one)."""
    num = int(tv_options.get("bound_samples", 4096))
    gen = torch.Generator().manual_seed(int(tv_options["seed"]) + 2)
    draw = draw_mixture(dist)
    levels = sigmas.double().tolist()
    sigma_max, sigma_1 = levels[0], levels[-2]
    horizon, horizon_se = mc_horizon_term(dist.log_prob, draw(num * 16, gen), sigma_max)
    noisy = draw(num * 16, gen)
    noisy = noisy + sigma_1 * torch.randn(noisy.shape, generator=gen, dtype=torch.float64)
    no_shift = torch.zeros(dist.dim, dtype=torch.float64)
    final, final_se = mc_final_step_term(
        denoiser, dist.log_prob, noisy_mixture_log_prob(dist, sigma_1), noisy, sigma_1, no_shift
    )
    kl_score = score_kl(cell.score_error, dist.dim, sigma_max, sigma_1)
    terms: dict[str, Any] = {
        "horizon_term": horizon,
        "score_term": math.sqrt(kl_score / 2),
        "final_term": final,
        "ou_horizon": ou_horizon(sigma_max),
        "discretisation_term": None,
        "bound": None,
        "bound_se": None,
    }
    if scheme in BOUNDED:
        kl_disc, kl_disc_se = mc_discretisation_kl(denoiser.inner, draw, sigmas, scheme, num, gen)
        kl_held = held_score_kl(cell.score_error, dist.dim, sigmas, scheme)
        path = path_term(kl_disc, kl_held, denoiser.error)
        # first order: d sqrt(KL / 2) / d KL_disc, with KL the sum or KL_disc alone (path_term)
        kl = max(kl_disc, 0.0) + (kl_held if denoiser.error.kind == "constant" else 0.0)
        path_se = kl_disc_se / (2 * math.sqrt(2 * max(kl, 1e-300)))
        terms["discretisation_term"] = math.sqrt(max(kl_disc, 0.0) / 2)
        terms["bound"] = horizon + path + final
        terms["bound_se"] = math.sqrt(horizon_se**2 + path_se**2 + final_se**2)
    return terms


def mixture_cell(
    dist: GaussianMixture,
    sampler: Sampler,
    name: str,
    cell: Cell,
    schedule: VPSDE,
    tv_options: dict,
    error: ScoreError,
) -> dict[str, Any]:
    covs = dist.covs.double()
    if not torch.allclose(covs, torch.diag_embed(covs.diagonal(dim1=1, dim2=2))):
        raise ConfigError(
            "ld-tv on a mixture needs diagonal component covariances (use data.distribution.stds)"
        )
    if dist.dim > 3:
        raise ConfigError(f"ld-tv histograms mixtures of dimension <= 3, got {dist.dim}: use data=gaussian")
    num, bins, seed = int(tv_options["num_samples"]), int(tv_options["bins"]), int(tv_options["seed"])
    exact = GaussianMixtureDenoiser(dist.means, covs, dist.weights)
    denoiser = PerturbedDenoiser(exact, cell.score_error, error)
    gen = torch.Generator().manual_seed(seed)
    edges = _histogram_edges(dist, bins)
    probs = mixture_cell_probabilities(dist, edges)
    counts = np.zeros(probs.shape)
    for start in range(0, num, 100_000):  # bin chunk by chunk: 10^7 draws never sit in memory
        x, _ = sampler(denoiser, schedule, (min(100_000, num - start), dist.dim), generator=gen)
        counts += np.histogramdd(x.double().numpy(), bins=edges)[0]
    reference = np.zeros(probs.shape)
    ref_gen = torch.Generator().manual_seed(seed + 1)
    for start in range(0, num, 1_000_000):
        chunk = dist.sample(min(1_000_000, num - start), ref_gen).double().numpy()
        reference += np.histogramdd(chunk, bins=edges)[0]
    row: dict[str, Any] = {
        "tv": histogram_tv(counts / num, probs),
        "tv_floor": histogram_tv(reference / num, probs),
        "tv_se": None,
        "tv_method": f"histogram ({bins}^{dist.dim} cells, {num} samples)",
        "kl": None,
    }
    sigmas = schedule.sampling_sigmas(sampler.num_steps, sampler.spacing)
    row.update(mixture_bound_terms(dist, denoiser, sigmas, name, cell, tv_options))
    return row


def run_cell(
    dist,
    sampler: Sampler,
    cell: Cell,
    beta_min: float,
    eps: float,
    tv_options: dict,
    perturbation: str = "constant",
) -> dict:
    """One cell's row; ``perturbation`` names the shape of the injected score error
    (:class:`~lightning_diff.diffusion.tv_bound.ScoreError`: ``constant`` or ``linear``, the latter
    seeded by ``tv.seed``)."""
    if not isinstance(dist, (Gaussian, GaussianMixture)):
        raise ConfigError(
            "ld-tv needs a known density with an exact denoiser: data=gaussian or data=gmm, "
            f"got {type(dist).__name__}"
        )
    schedule = VPSDE(beta_min=beta_min, beta_max=cell.horizon, eps=eps)
    sampler = sampler.with_num_steps(cell.steps)
    error = score_error(dist, perturbation, int(tv_options["seed"]))
    start = time.perf_counter()
    one_cell = gaussian_cell if isinstance(dist, Gaussian) else mixture_cell
    row = one_cell(dist, sampler, cell.sampler, cell, schedule, tv_options, error)
    base = {
        "sampler": cell.sampler,
        "steps": cell.steps,
        "score_error": cell.score_error,
        "horizon": cell.horizon,
        "perturbation": perturbation,
    }
    row = {**base, **row, "seconds": time.perf_counter() - start}
    if row.get("bound") is not None:
        # Histograms: less the finite-sample floor (roughly what the sampling noise adds).
        low = row["tv"] - 2 * (row["tv_se"] or 0.0) - (row.get("tv_floor") or 0.0)
        row["within_bound"] = bool(low <= row["bound"] + 2 * (row.get("bound_se") or 0.0))
    else:
        row["within_bound"] = None
    return row
