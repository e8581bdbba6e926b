"""The terms of the Girsanov bound on total variation for Gaussian data on a sampler's grid.

The bound of Korrapati, Baranwal & Shah (2024) (``../shared/MATH.md``, "Discrete vs continuous"),
with every term computed for one cell (data ``N(mu, Sigma)``, a grid of noise levels, an injected
score error of RMS ``epsilon`` per coordinate) rather than up to constants:

    TV(samples, data) <= TV(prior, p_T)                    horizon
                       + sqrt(KL_path / 2)                  discretisation and score error (Pinsker)
                       + TV(final step of p_tau1, data)     the last step, the denoiser's output

* horizon: the Ornstein-Uhlenbeck flow contracts KL to its Gaussian by ``e^{-2T}`` (``T`` the OU
  time, ``e^{-2T} = 1 / (1 + sigma_max^2)``), so ``TV <= e^{-T} sqrt(KL(data || N(0, I)) / 2)``.
* KL_path (Girsanov): for a scheme that holds the drift over each step and keeps the SDE's own
  diffusion, ``KL = 1/2 sum_k int E|b(x_t, t) - b(x_{t_k}, t_k)|^2 / g^2 dt`` under the exact reverse
  path, whose pairs ``(x_t, x_{t_k})`` have the forward process's joint law. For Gaussian data both
  drifts are affine, so the expectation is closed form per eigen-direction of ``Sigma`` and only the
  time integral is numerical (Gauss-Legendre in ``log(1 + sigma^2)``). Euler-Maruyama in the variance
  time ``tau = sigma^2`` (``g = 1``, drift the VE score) and the exponential integrator in the VP
  coordinates (``g^2 = beta``, only the score held) are such schemes; ancestral sampling (another
  noise variance) and the ODE samplers (no noise) are not, and get no bound.
  An injected error ``epsilon u_sigma(z)`` (:class:`ScoreError`, ``E|u_sigma|^2 = dim`` under the noisy
  data at every level) in the VP score adds, in continuous time,
  ``1/2 epsilon^2 dim log((1 + sigma_max^2) / (1 + sigma_1^2))``: the seed's ``sqrt(T) epsilon`` term
  (``score_term``). The bound uses the same error as each scheme holds it over its steps
  (:func:`held_score_kl`). A constant error adds its KL to the discretisation KL (the discretisation
  error has mean zero under the exact path); an error that depends on ``x`` can correlate with it,
  so its square root adds instead (Minkowski in ``L^2`` of time and path: ``sqrt(KL) <=
  sqrt(KL_disc) + sqrt(KL_error)``).
* the last step maps ``x`` at ``sigma_1`` to the denoiser's output plus the error, an affine map of
  ``p_tau1`` (``N(mu + delta, Sigma (Sigma + sigma_1^2)^{-1} Sigma)`` for a constant error), against
  the data by Pinsker (the smaller KL of the two directions); data processing carries the path error
  through this map.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.utils import as_sigma_batch
from lightning_diff.metrics.gaussian_tv import gaussian_kl

BOUNDED = ("euler_maruyama", "exponential")
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(24)


PERTURBATIONS = ("constant", "linear")


class ScoreError(torch.nn.Module):
    """The shape ``u_sigma(z)`` of an injected VP score error, of unit RMS per coordinate under the
    noisy data at every noise level: ``E_{z ~ p_sigma} |u_sigma(z)|^2 = dim``.

    ``u_sigma(z) = (offset + matrix z) / r_sigma`` with ``r_sigma^2 = E|offset + matrix z|^2 / dim``,
    which needs only the VP marginal's mean ``sqrt(ab) mu`` and covariance ``ab Sigma + (1 - ab) I``
    (``ab = 1 / (1 + sigma^2)``), so it is exact for any data of known mean and covariance.

    * :meth:`constant`: ``offset`` all ones, no matrix (``r = 1``): the error moves the output's mean.
    * :meth:`linear`: no offset, ``matrix`` a seeded symmetric positive definite matrix with
      eigenvalues spread over [0.5, 1.5]: the error grows with ``|z|`` and changes the output's
      covariance too. Affine in ``z`` keeps a Gaussian's sampler outputs exactly Gaussian, and a
      positive definite matrix keeps the last denoising step a gradient of a convex function (one to
      one, so its output density follows by the change of variables).
    """

    def __init__(self, offset: Tensor, matrix: Tensor | None, data_mean: Tensor, data_cov: Tensor):
        super().__init__()
        dim = data_mean.numel()
        matrix = torch.zeros(dim, dim, dtype=torch.float64) if matrix is None else matrix
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float64).reshape(dim))
        self.register_buffer("matrix", torch.as_tensor(matrix, dtype=torch.float64).reshape(dim, dim))
        self.register_buffer("data_mean", data_mean.double().reshape(dim))
        self.register_buffer("data_cov", data_cov.double().reshape(dim, dim))
        self.kind = "linear" if bool(self.matrix.abs().sum() > 0) else "constant"

    @classmethod
    def constant(cls, dim: int, direction: Tensor | None = None) -> ScoreError:
        """``direction`` (default all ones) at every ``z``, scaled to RMS 1 per coordinate."""
        direction = torch.ones(dim, dtype=torch.float64) if direction is None else direction
        zeros = torch.zeros(dim, dtype=torch.float64)
        return cls(direction, None, zeros, torch.eye(dim, dtype=torch.float64))

    @classmethod
    def linear(cls, data_mean: Tensor, data_cov: Tensor, seed: int = 0) -> ScoreError:
        dim = data_mean.numel()
        gen = torch.Generator().manual_seed(int(seed))
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        spread = torch.linspace(0.5, 1.5, dim, dtype=torch.float64) if dim > 1 else torch.ones(1).double()
        return cls(torch.zeros(dim), q @ torch.diag(spread) @ q.T, data_mean, data_cov)

    @classmethod
    def named(cls, kind: str, data_mean: Tensor, data_cov: Tensor, seed: int = 0) -> ScoreError:
        if kind == "constant":
            return cls.constant(data_mean.numel())
        if kind == "linear":
            return cls.linear(data_mean, data_cov, seed)
        raise ValueError(f"perturbation={kind!r} is not one of {', '.join(PERTURBATIONS)}")

    def rms(self, sigma: Tensor) -> Tensor:
        """``r_sigma`` for a batch of noise levels ``(n,)``."""
        ab = 1 / (1 + sigma.double() ** 2)
        centre = self.offset + ab.sqrt()[:, None] * (self.matrix @ self.data_mean)  # E[offset + M z]
        wcw = torch.trace(self.matrix @ self.data_cov @ self.matrix.T)
        www = torch.trace(self.matrix @ self.matrix.T)
        second = (centre**2).sum(1) + ab * wcw + (1 - ab) * www
        return (second / self.offset.numel()).sqrt()

    def forward(self, z: Tensor, sigma: Tensor) -> Tensor:
        """``u_sigma(z)`` for rows ``z`` ``(n, dim)`` (float64) at levels ``sigma`` ``(n,)``."""
        return (self.offset + z @ self.matrix.T) / self.rms(sigma)[:, None]


class PerturbedDenoiser(Denoiser):
    """``inner`` with an error ``epsilon * u_sigma(z)`` added to its VP score at every noise level
    (``u`` a :class:`ScoreError`, or a fixed direction tensor for a constant one).

    In the denoiser's coordinates (``x = z sqrt(1 + sigma^2)``) the VP score error ``e`` is a VE score
    error ``e / sqrt(1 + sigma^2)``, i.e. ``D + epsilon sigma^2 / sqrt(1 + sigma^2) * u_sigma(z)``.
    Affine in ``x`` when ``inner`` is.
    """

    def __init__(self, inner: Denoiser, epsilon: float, error: ScoreError | Tensor):
        super().__init__()
        self.inner, self.epsilon = inner, float(epsilon)
        if not isinstance(error, ScoreError):
            direction = torch.as_tensor(error, dtype=torch.float64).reshape(-1)
            error = ScoreError.constant(direction.numel(), direction)
        self.error = error

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self.inner(x, sigma)
        if self.epsilon == 0:
            return out
        s = as_sigma_batch(sigma, x).to(torch.float64)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        u = self.error(flat / torch.sqrt(1 + s**2)[:, None], s)
        shift = self.epsilon * (s**2 / torch.sqrt(1 + s**2))[:, None] * u
        return out + shift.reshape(out.shape).to(out.dtype)


def ou_horizon(sigma_max: float) -> float:
    """The Ornstein-Uhlenbeck time ``T`` of a VP grid that starts at ``sigma_max``."""
    return 0.5 * math.log1p(sigma_max**2)


def horizon_term(mean: Tensor, cov: Tensor, sigma_max: float) -> float:
    """``e^{-T} sqrt(KL(data || N(0, I)) / 2)``."""
    dim = mean.numel()
    eye = torch.eye(dim, dtype=torch.float64)
    kl = gaussian_kl(mean, cov, torch.zeros(dim, dtype=torch.float64), eye)
    return math.exp(-ou_horizon(sigma_max)) * math.sqrt(kl / 2)


def score_kl(epsilon: float, dim: int, sigma_max: float, sigma_1: float) -> float:
    """Girsanov KL of the injected error over the stochastic steps (``sigma_max`` down to ``sigma_1``)."""
    return 0.5 * epsilon**2 * dim * (math.log1p(sigma_max**2) - math.log1p(sigma_1**2))


def held_score_kl(epsilon: float, dim: int, sigmas: Tensor, scheme: str) -> float:
    """The injected error's Girsanov KL as the scheme sees it, held at each step's start: exponential
    integrator ``1/2 eps^2 dim sum d log(1 + tau)`` (equal to :func:`score_kl`); Euler-Maruyama
    ``1/2 eps^2 dim sum (tau_k - tau_{k+1}) / (1 + tau_k)`` (the VE error shrinks as ``1/sqrt(1 + tau)``)."""
    levels = sigmas.double().tolist()
    total = 0.0
    for sigma, sigma_next in zip(levels[:-1], levels[1:], strict=False):
        if sigma_next == 0:
            continue
        if scheme == "euler_maruyama":
            total += (sigma**2 - sigma_next**2) / (1 + sigma**2)
        else:
            total += math.log1p(sigma**2) - math.log1p(sigma_next**2)
    return 0.5 * epsilon**2 * dim * total


def _interval_integral(fn, lo: float, hi: float) -> float:
    """``int_lo^hi fn(u) du`` by 24-point Gauss-Legendre (``fn`` takes an array of nodes)."""
    half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
    return float(half * np.sum(_WEIGHTS * fn(mid + half * _NODES)))


def ve_drift_gap(lam: np.ndarray, tau: np.ndarray, tau_k: float) -> np.ndarray:
    """``E|score_VE(x_tau, tau) - score_VE(x_tau_k, tau_k)|^2`` per eigen-direction of variance ``lam``,
    for ``x_tau`` from the exact marginal and ``x_tau_k = x_tau + sqrt(tau_k - tau) n`` (``tau_k >= tau``)."""
    return (lam + tau) * (1 / (lam + tau_k) - 1 / (lam + tau)) ** 2 + (tau_k - tau) / (lam + tau_k) ** 2


def vp_score_gap(lam: np.ndarray, tau: np.ndarray, tau_k: float) -> np.ndarray:
    """The same for the VP score, ``z = x / sqrt(1 + tau)``: with ``ab = 1 / (1 + tau)``,
    ``v = ab lam + 1 - ab`` and ``a = sqrt(ab_k / ab)``, ``z_k - m_k = a (z - m) + sqrt(1 - a^2) n``."""
    ab, ab_k = 1 / (1 + tau), 1 / (1 + tau_k)
    v, v_k = ab * lam + 1 - ab, ab_k * lam + 1 - ab_k
    a = np.sqrt(ab_k / ab)
    return v * (a / v_k - 1 / v) ** 2 + (1 - a**2) / v_k**2


def discretisation_kl(eigvals: Tensor, sigmas: Tensor, scheme: str) -> float:
    """Girsanov KL between the exact reverse path and a drift-holding scheme on ``sigmas`` (descending,
    ending at 0), over every step but the last (which :func:`final_step_term` accounts for).

    ``scheme``: ``euler_maruyama`` (VE variance time, drift ``score_VE``) or ``exponential`` (VP
    coordinates, score ``score_VP`` held, linear part exact); the expected gaps per eigen-direction of
    the data covariance are :func:`ve_drift_gap` and :func:`vp_score_gap`.
    """
    if scheme not in BOUNDED:
        raise ValueError(f"no Girsanov bound for {scheme!r}: only {', '.join(BOUNDED)}")
    lam = eigvals.double().numpy()[:, None]
    levels = sigmas.double().tolist()
    total = 0.0
    for sigma, sigma_next in zip(levels[:-1], levels[1:], strict=False):
        if sigma_next == 0:
            continue
        tau_k = sigma**2

        def integrand(u: np.ndarray, tau_k: float = tau_k) -> np.ndarray:  # u = log(1 + tau): beta dt = du
            tau = np.expm1(u)[None, :]
            if scheme == "euler_maruyama":  # d tau = (1 + tau) du, g = 1
                return ve_drift_gap(lam, tau, tau_k).sum(0) * (1 + tau[0])
            return vp_score_gap(lam, tau, tau_k).sum(0)  # |beta Delta|^2 / g^2 dt = |Delta|^2 du

        total += _interval_integral(integrand, math.log1p(sigma_next**2), math.log1p(tau_k))
    return 0.5 * total


def final_step_term(mean: Tensor, cov: Tensor, sigma_1: float, epsilon: float, error: ScoreError) -> float:
    """Pinsker's bound on the TV between the data and the last step's output on ``p`` at ``sigma_1``:
    ``y = D(x) + k u(x / sqrt(1 + sigma_1^2))`` with ``k = epsilon sigma_1^2 / sqrt(1 + sigma_1^2)`` and
    ``D(x) = mu + Sigma (Sigma + sigma_1^2)^{-1} (x - mu)``, affine in ``x ~ N(mu, Sigma + sigma_1^2)``."""
    cov = cov.double()
    dim = mean.numel()
    noisy_cov = cov + sigma_1**2 * torch.eye(dim, dtype=torch.float64)
    scale = math.sqrt(1 + sigma_1**2)
    k = epsilon * sigma_1**2 / scale / float(error.rms(torch.tensor([sigma_1], dtype=torch.float64)))
    linear = torch.linalg.solve(noisy_cov, cov).T + (k / scale) * error.matrix  # dy / dx
    out_mean = mean.double() + k * (error.offset + error.matrix @ mean.double() / scale)
    out_cov = linear @ noisy_cov @ linear.T
    kl = min(gaussian_kl(mean, cov, out_mean, out_cov), gaussian_kl(out_mean, out_cov, mean, cov))
    return math.sqrt(max(kl, 0.0) / 2)


def path_term(kl_disc: float, kl_error: float, error: ScoreError) -> float:
    """``sqrt(KL_path / 2)``: the two KLs add for a constant error, their square roots for one that
    depends on ``x`` (module docstring)."""
    kl_disc = max(kl_disc, 0.0)
    if error.kind == "constant":
        return math.sqrt((kl_disc + kl_error) / 2)
    return math.sqrt(kl_disc / 2) + math.sqrt(kl_error / 2)


def bound_terms(
    mean: Tensor, cov: Tensor, sigmas: Tensor, scheme: str, epsilon: float, error: ScoreError
) -> dict[str, float | None]:
    """Every term of the bound for one cell; ``bound`` is None for schemes it does not cover."""
    levels = sigmas.double().tolist()
    sigma_max, sigma_1 = levels[0], levels[-2]
    dim = mean.numel()
    eigvals = torch.linalg.eigvalsh(cov.double())
    kl_score = score_kl(epsilon, dim, sigma_max, sigma_1)
    terms: dict[str, float | None] = {
        "horizon_term": horizon_term(mean, cov, sigma_max),
        "score_term": math.sqrt(kl_score / 2),
        "final_term": final_step_term(mean, cov, sigma_1, epsilon, error),
        "ou_horizon": ou_horizon(sigma_max),
    }
    if scheme in BOUNDED:
        kl_disc = discretisation_kl(eigvals, sigmas, scheme)
        kl_held = held_score_kl(epsilon, dim, sigmas, scheme)
        terms["discretisation_term"] = math.sqrt(kl_disc / 2)
        terms["bound"] = terms["horizon_term"] + path_term(kl_disc, kl_held, error) + terms["final_term"]
    else:
        terms["discretisation_term"] = None
        terms["bound"] = None
    return terms


# Monte Carlo versions for any data with an exact denoiser and density (``ld-tv data=gmm``). Each
# returns ``(value, standard error)``; ``draw(n, generator)`` gives float64 data rows.


def mc_horizon_term(log_prob, draws: Tensor, sigma_max: float) -> tuple[float, float]:
    """``e^{-T} sqrt(KL(data || N(0, I)) / 2)`` with KL by Monte Carlo over ``draws`` of the data."""
    dim = draws.shape[1]
    log_ratio = log_prob(draws).double() + 0.5 * (draws**2).sum(1) + 0.5 * dim * math.log(2 * math.pi)
    kl, kl_se = float(log_ratio.mean()), float(log_ratio.std() / math.sqrt(len(draws)))
    scale = math.exp(-ou_horizon(sigma_max))
    value = scale * math.sqrt(max(kl, 0.0) / 2)
    return value, scale * kl_se / (2 * math.sqrt(2 * max(kl, 1e-300)))


def mc_discretisation_kl(
    denoiser: Denoiser, draw, sigmas: Tensor, scheme: str, num: int, generator: torch.Generator
) -> tuple[float, float]:
    """:func:`discretisation_kl` with the expected gap by Monte Carlo: ``num`` forward pairs
    ``(x_tau, x_tau_k)`` from fresh data draws at each Gauss-Legendre node of each step, the VE scores
    from ``denoiser`` (Tweedie). The standard error is that of the node means, summed in quadrature."""
    if scheme not in BOUNDED:
        raise ValueError(f"no Girsanov bound for {scheme!r}: only {', '.join(BOUNDED)}")
    levels = sigmas.double().tolist()
    total, variance = 0.0, 0.0
    for sigma, sigma_next in zip(levels[:-1], levels[1:], strict=False):
        if sigma_next == 0:
            continue
        tau_k = sigma**2
        lo, hi = math.log1p(sigma_next**2), math.log1p(tau_k)
        half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
        tau = torch.from_numpy(np.expm1(mid + half * _NODES)).repeat_interleave(num)  # (nodes * num,)
        x0 = draw(len(tau), generator)
        x = x0 + tau.sqrt()[:, None] * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        x_k = x + (tau_k - tau).clamp(min=0).sqrt()[:, None] * torch.randn(
            x0.shape, generator=generator, dtype=torch.float64
        )
        score = denoiser.score(x, tau.sqrt())
        score_k = denoiser.score(x_k, torch.full_like(tau, sigma))
        if scheme == "euler_maruyama":
            gap = ((score - score_k) ** 2).sum(1) * (1 + tau)
        else:
            gap = (((1 + tau).sqrt()[:, None] * score - math.sqrt(1 + tau_k) * score_k) ** 2).sum(1)
        gap = gap.reshape(len(_NODES), num)
        weights = torch.from_numpy(half * _WEIGHTS)
        total += float((weights * gap.mean(1)).sum())
        variance += float((weights**2 * gap.var(1) / num).sum())
    return 0.5 * total, 0.5 * math.sqrt(variance)


def mc_final_step_term(
    denoiser: Denoiser, log_prob, noisy_log_prob, noisy: Tensor, sigma_1: float, shift: Tensor
) -> tuple[float, float]:
    """TV between the data and ``D(x, sigma_1) + shift`` for ``x ~ p_sigma_1`` (rows ``noisy``), exactly
    through the change of variables: ``D`` is the gradient of a convex function (its Jacobian is the
    posterior covariance over ``sigma_1^2``), so the output density at ``y = D(x) + shift`` is
    ``p_sigma_1(x) / det J(x)`` and ``TV = E[(1 - p_data(y) det J(x) / p_sigma_1(x))_+]``."""
    x = noisy.double().clone().requires_grad_(True)
    with torch.enable_grad():
        out = denoiser(x, torch.full((len(x),), sigma_1, dtype=torch.float64))
        rows = [
            torch.autograd.grad(out[:, j].sum(), x, retain_graph=j < x.shape[1] - 1)[0]
            for j in range(x.shape[1])
        ]
    jac = torch.stack(rows, 1)
    _, log_det = torch.linalg.slogdet(jac)
    y = out.detach() + shift.double()
    log_ratio = log_prob(y).double() + log_det - noisy_log_prob(noisy.double()).double()
    excess = (1 - log_ratio.exp()).clamp(min=0)
    return float(excess.mean()), float(excess.std() / math.sqrt(len(excess)))
