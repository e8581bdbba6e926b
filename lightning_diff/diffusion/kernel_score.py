"""A kernel score model with learned local precisions, after the WPO-informed kernel model.

Zhang, Liu, Li, Katsoulakis & Osher 2024 (arXiv 2402.06162) read score-based generation as a
Wasserstein proximal operator of the cross-entropy; a Cole-Hopf transform turns the backward HJB
equation into a heat equation, so the score at every noise level is that of a *heat-smoothed terminal
density*. They build that terminal density from Gaussian kernels placed at the training points, each
with a learned local precision matrix, and fit the precisions by implicit score matching at the
terminal (data) time. See ``docs/kernel_wpo.md`` for which details follow the paper and which are ours.

The structure implemented here (in the package's variance-exploding coordinates ``x = x0 + sigma n``):

* data-time density ``rho_0(x) = (1/N) sum_i N(x; y_i, C_i)``, ``C_i = P_i^{-1}``;
* noised density ``rho_sigma(x) = (1/N) sum_i N(x; y_i, S_i)``, ``S_i = C_i + sigma^2 I`` (exact: the
  heat flow keeps a Gaussian mixture a Gaussian mixture);
* score ``s(x) = sum_i w_i(x) g_i(x)``, ``g_i = -S_i^{-1} (x - y_i)``, ``w`` the softmax of the
  component log-densities; ``D(x, sigma) = x + sigma^2 s(x)``.

Precision parameterisations: ``"isotropic"`` (``P_i = p_i I``), ``"diagonal"`` (``P_i = diag(p_i)``)
and ``"lowrank"`` (``P_i = diag(p_i) + U_i U_i^T``, ``U_i`` of rank ``r``). Every ``S_i^{-1}`` is then
``diag(a_i) + V_i V_i^T`` with ``V_i`` of ``r`` columns (two Woodbury steps), so nothing ``d x d`` is
ever formed. With ``covariance_factors=True`` the factors add covariance instead
(``C_i = diag(p_i)^{-1} + W_i W_i^T``, a local tangent space) and ``S_i^{-1} = diag(a_i) - V_i V_i^T``.
The sums over training points run over chunks with a running log-sum-exp, in matrix-product form
(memory ``batch x chunk x r``), or over each query's ``top_k`` Euclidean nearest training points.

As every ``p_i -> inf`` the score tends to the empirical (memorizing) score of the training set.
:func:`loo_objective` is Hyvarinen's objective ``E[1/2 |s|^2 + div s]`` on the training points, each
scored by the mixture of the *other* points (leave-one-out) so that the self-centre optimum
(``p_i -> inf``, which sends the objective to minus infinity) is not available; the family's
LightningModule (``models/kernel_wpo.py``) minimises it.

Over 400 lines: one class, whose chunked matrix-product sums and nearest-neighbour sums share the
component algebra of ``_components`` and the running log-sum-exp of ``_accumulate``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.random import normal_rows, pick_components
from lightning_diff.diffusion.utils import append_dims, as_sigma_batch

PRECISIONS = ("isotropic", "diagonal", "lowrank")


def scott_bandwidth(train: Tensor) -> float:
    """Scott's rule ``h = s N^{-1/(d+4)}`` with ``s`` the root mean per-coordinate variance."""
    flat = train.reshape(train.shape[0], -1).to(torch.float64)
    n, d = flat.shape
    scale = flat.var(0, unbiased=False).mean().sqrt().item()
    return scale * n ** (-1.0 / (d + 4))


def _safe(m: Tensor) -> Tensor:
    """Replace -inf running maxima by 0 so ``exp(v - m)`` stays finite (rows with no component yet)."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


class KernelScore(Denoiser):
    """Gaussian-mixture score with one learned local precision per training point.

    Args:
        train: (N, ...) training points; flattened to (N, d) and stored in float64.
        precision: ``"isotropic"``, ``"diagonal"`` or ``"lowrank"``.
        rank: columns of ``U_i`` for ``"lowrank"`` (ignored otherwise).
        bandwidth: initial kernel standard deviation ``h`` (``P_i = I / h^2``); Scott's rule when None.
        chunk_size: training points per chunk of the running log-sum-exp.
        top_k: when set, each query only sees its ``top_k`` nearest training points (an approximation).
        init_scale: standard deviation of the random initial ``U_i`` entries, relative to ``1 / h``.
        seed: seeds the initial ``U_i``.
        tied: share one precision diagonal across all points (``U_i`` stay per point). Per-point
            isotropic or diagonal precisions are not identifiable by the leave-one-out objective alone:
            a kernel can shrink onto a close neighbour and drive the loss down without bound (see
            ``docs/kernel_wpo.md``); tying removes that direction.
    """

    def __init__(
        self,
        train: Tensor,
        precision: str = "isotropic",
        rank: int = 2,
        bandwidth: float | None = None,
        chunk_size: int = 1024,
        top_k: int | None = None,
        init_scale: float = 0.1,
        seed: int = 0,
        tied: bool = False,
        log_prec: Tensor | None = None,
        factors: Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        covariance_factors: bool = False,
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        flat = torch.as_tensor(train).reshape(train.shape[0], -1).to(dtype)
        n, d = flat.shape
        if n < 2:
            raise ValueError("need at least two training points")
        self.register_buffer("points", flat)
        self.precision = precision
        self.chunk_size = int(chunk_size)
        self.top_k = None if top_k is None else int(top_k)
        # Factors U add precision (P = D + U U^T, the default) or covariance (C = D^{-1} + U U^T: wide
        # along a few directions, a local tangent space). Either way S^{-1} = diag(a) + sign V V^T.
        self.covariance_factors = bool(covariance_factors)
        self.sign = -1.0 if self.covariance_factors else 1.0
        if log_prec is not None:
            # Precisions computed elsewhere (a PrecisionField): plain tensors, gradients flow through.
            self.log_prec = log_prec.to(dtype)
            self.factors = None if factors is None else factors.to(dtype)
            self.tied = self.log_prec.shape[0] == 1 and n > 1
            self.rank = 0 if self.factors is None else self.factors.shape[-1]
            return
        h = float(bandwidth) if bandwidth is not None else scott_bandwidth(flat)
        self.rank = int(rank) if precision == "lowrank" else 0
        self.tied = bool(tied)
        shape = (1 if tied else n, 1 if precision == "isotropic" else d)
        log_p = torch.full(shape, -2 * math.log(h), dtype=dtype)
        self.log_prec = nn.Parameter(log_p)
        if self.rank > 0:
            gen = torch.Generator().manual_seed(int(seed))
            scale = init_scale * (h if self.covariance_factors else 1 / h)  # a std or a precision scale
            u = torch.randn(n, d, self.rank, generator=gen, dtype=torch.float64) * scale
            self.factors = nn.Parameter(u.to(dtype))
        else:
            self.register_parameter("factors", None)

    @property
    def num_points(self) -> int:
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        return self.points.shape[1]

    def precision_matrices(self) -> Tensor:
        """The (N, d, d) precisions ``P_i`` (for inspection and small tests only)."""
        if self.covariance_factors:
            return torch.linalg.inv(self.covariances())
        diag = self._log_prec(torch.arange(self.num_points, device=self.points.device)).exp()
        out = torch.diag_embed(diag.expand(self.num_points, self.dim))
        if self.factors is not None:
            out = out + self.factors @ self.factors.transpose(1, 2)
        return out

    def covariances(self) -> Tensor:
        """The (N, d, d) data-time covariances ``C_i = P_i^{-1}``."""
        if not self.covariance_factors:
            return torch.linalg.inv(self.precision_matrices())
        diag = (-self._log_prec(torch.arange(self.num_points, device=self.points.device))).exp()
        out = torch.diag_embed(diag.expand(self.num_points, self.dim))
        return out + self.factors @ self.factors.transpose(1, 2)

    def _log_prec(self, idx: Tensor) -> Tensor:
        if self.tied:
            return self.log_prec[0].expand(*idx.shape, self.log_prec.shape[1])
        return self.log_prec[idx]

    # ------------------------------------------------------------------ components
    def _components(self, idx: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """For components ``idx`` (any shape): centres, ``a``, ``V``, ``log det S`` and ``tr S^{-1}``.

        ``S^{-1} = diag(a) + V V^T``. Shapes: ``idx.shape + (d,)``, ``(1,)`` or ``(d,)`` for ``a``,
        ``(d, r)`` for ``V``, ``()`` for the scalars.
        """
        d, s2 = self.dim, float(sigma) ** 2
        y = self.points[idx]
        p = self._log_prec(idx).exp()
        inv_p = 1 / p
        e = inv_p + s2  # the diagonal of D^{-1} + sigma^2 I
        a = 1 / e
        if e.shape[-1] == 1:  # one shared diagonal value (isotropic, or the floor of a full field)
            logdet = d * e.squeeze(-1).log()
            trace = d * a.squeeze(-1)
        else:
            logdet = e.log().sum(-1)
            trace = a.sum(-1)
        if self.factors is None:
            return y, a, None, logdet, trace
        u = self.factors[idx]  # (..., d, r)
        eye = torch.eye(self.rank, dtype=u.dtype, device=u.device)
        if self.covariance_factors:
            # S = E + W W^T: S^{-1} = E^{-1} - V V^T with V = E^{-1} W L^{-T}, L L^T = I + W^T E^{-1} W.
            ew = u * a[..., None]
            chol_m = torch.linalg.cholesky(eye + u.transpose(-1, -2) @ ew)
            v = torch.linalg.solve_triangular(chol_m, ew.transpose(-1, -2), upper=False).transpose(-1, -2)
            logdet_m = 2 * chol_m.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            return y, a, v, logdet + logdet_m, trace - (v**2).sum((-1, -2))
        w = u * inv_p[..., None]  # D^{-1} U
        k = eye + u.transpose(-1, -2) @ w  # I + U^T D^{-1} U
        # M = K - W^T E^{-1} W, written without cancellation: I + U^T diag(sigma^2 a / p) U.
        m = eye + u.transpose(-1, -2) @ (u * (s2 * a * inv_p)[..., None])
        chol_m = torch.linalg.cholesky(m)
        chol_k = torch.linalg.cholesky(k)
        # V = E^{-1} W L^{-T}, so V V^T = E^{-1} W M^{-1} W^T E^{-1}.
        rhs = (w * a[..., None]).transpose(-1, -2)
        v = torch.linalg.solve_triangular(chol_m, rhs, upper=False).transpose(-1, -2)
        logdet_m = 2 * chol_m.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logdet_k = 2 * chol_k.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return y, a, v, logdet + logdet_m - logdet_k, trace + (v**2).sum((-1, -2))

    def _terms(self, x: Tensor, comps, need_div: bool, exclude_self: bool):
        """Per-query components (``comps`` gathered as (B, k, ...)): the explicit form.

        Returns component log-densities (B, k), ``|g_i|^2 - tr S_i^{-1}`` (B, k) or None, and a
        function of the weights ``w`` (B, k) giving ``sum_i w_i g_i`` (B, d).
        """
        y, a, v, logdet, trace = comps
        delta = x[:, None, :] - y  # (B, k, d)
        g = a * delta
        quad = (delta * g).sum(-1)
        if v is not None:
            z = torch.einsum("bkdr,bkd->bkr", v, delta)
            quad = quad + self.sign * (z**2).sum(-1)
            g = g + self.sign * torch.einsum("bkdr,bkr->bkd", v, z)
        logits = -0.5 * (quad + logdet + self.dim * math.log(2 * math.pi))
        if exclude_self:
            logits = logits.masked_fill((delta == 0).all(-1), -math.inf)
        q = (g**2).sum(-1) - trace if need_div else None
        return logits, q, lambda w: -(w[..., None] * g).sum(1)

    def _terms_shared(self, x: Tensor, comps, need_div: bool, exclude_self: bool):
        """A chunk of components shared by every query, in matrix-product form.

        With ``delta_i = x - y_i`` and ``S_i^{-1} = diag(a_i) + V_i V_i^T``, every sum over coordinates
        expands into products of ``x`` with per-component vectors, so memory is ``B x c (x r)`` and
        nothing of size ``B x c x d`` is formed:
        ``delta^T diag(a) delta = x^2 . a - 2 x . (a y) + y^2 . a``, ``z = V^T delta = V^T x - V^T y``.
        """
        y, a, v, logdet, trace = comps
        c, d = y.shape
        a = a.expand(c, d)
        x2 = x * x

        def diag_form(coef: Tensor) -> Tensor:  # delta_i^T diag(coef_i) delta_i for all (b, i)
            return x2 @ coef.T - 2 * x @ (coef * y).T + (coef * y * y).sum(1)

        def project(m: Tensor) -> Tensor:  # m_i^T delta_i for all (b, i) as (B, r, c): one matrix product
            r = m.shape[-1]  # (r before c, so sums over r add whole (B, c) planes)
            return (x @ m.permute(1, 2, 0).reshape(d, r * c)).reshape(-1, r, c) - (m * y[..., None]).sum(1).T

        quad = diag_form(a)
        z = None
        if v is not None:
            z = project(v)
            quad = quad + self.sign * (z**2).sum(1)
        logits = -0.5 * (quad + logdet + d * math.log(2 * math.pi))
        if exclude_self:  # |x - y|^2 within rounding of 0, from the same expansion
            with torch.no_grad():
                scale = x2.sum(1, keepdim=True) + (y * y).sum(1)
                close = scale - 2 * x @ y.T <= 64 * torch.finfo(x.dtype).eps * scale
            logits = logits.masked_fill(close, -math.inf)
        q = None
        if need_div:
            # |g_i|^2 = |a delta|^2 + 2 (V^T diag(a) delta) . z + |V z|^2, and |V z|^2 = |R z|^2 with
            # V^T V = R^T R, so each term is again a projection of delta.
            q = diag_form(a * a) - trace
            if v is not None:
                eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
                chol = torch.linalg.cholesky(v.mT @ v + 1e-30 * eye)
                cross = (project(v * a[..., None]) * z).sum(1)
                q = q + 2 * self.sign * cross + (project(v @ chol) ** 2).sum(1)

        def weighted_g(w: Tensor) -> Tensor:  # sum_i w_i g_i = -sum_i w_i (diag(a_i) delta_i + V_i z_i)
            out = x * (w @ a) - w @ (a * y)
            if v is not None:
                r = v.shape[-1]
                vz = (w[:, None, :] * z).reshape(-1, r * c) @ v.permute(2, 0, 1).reshape(r * c, d)
                out = out + self.sign * vz
            return -out

        return logits, q, weighted_g

    def _neighbours(self, x: Tensor, k: int) -> Tensor:
        """Indices (B, k) of each query's k nearest training points, found chunk by chunk."""
        best_d = torch.full((x.shape[0], 0), math.inf, dtype=x.dtype, device=x.device)
        best_i = torch.zeros((x.shape[0], 0), dtype=torch.long, device=x.device)
        for start in range(0, self.num_points, self.chunk_size):
            pts = self.points[start : start + self.chunk_size]
            dist = torch.cdist(x, pts)
            idx = torch.arange(start, start + pts.shape[0], device=x.device).expand_as(dist)
            best_d = torch.cat([best_d, dist], 1)
            best_i = torch.cat([best_i, idx], 1)
            keep = best_d.topk(min(k, best_d.shape[1]), dim=1, largest=False).indices
            best_d, best_i = best_d.gather(1, keep), best_i.gather(1, keep)
        return best_i

    def _accumulate(
        self,
        x: Tensor,
        sigma: float,
        exclude: Tensor | None = None,
        need_div: bool = False,
        exclude_self: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``log sum_i exp(logit_i)`` (B,), the score (B, d) and, optionally, ``sum_i w_i q_i`` (B,).

        All ``x`` share one ``sigma``. ``exclude`` (B,) drops one component per query (leave-one-out);
        ``exclude_self`` drops every component centred exactly at its query (a training point never
        scores itself, whichever batch it arrives in).
        """
        b = x.shape[0]
        extra = exclude is not None or exclude_self
        if self.top_k is not None and self.top_k < self.num_points - extra:
            k = self.top_k + extra
            blocks = [self._neighbours(x.detach(), k)]
        else:
            arange = torch.arange(self.num_points, device=x.device)
            blocks = [arange[s : s + self.chunk_size] for s in range(0, self.num_points, self.chunk_size)]
        run_max = torch.full((b,), -math.inf, dtype=x.dtype, device=x.device)
        total = torch.zeros(b, dtype=x.dtype, device=x.device)
        score = torch.zeros_like(x)
        div = torch.zeros(b, dtype=x.dtype, device=x.device) if need_div else None
        for idx in blocks:
            comps = self._components(idx, sigma)
            terms = self._terms_shared if idx.ndim == 1 else self._terms
            logits, q, weighted_g = terms(x, comps, need_div, exclude_self)
            if exclude is not None:
                full_idx = idx if idx.ndim == 2 else idx.expand(b, -1)
                logits = logits.masked_fill(full_idx == exclude[:, None], -math.inf)
            if idx.ndim == 2 and extra:
                # One neighbour more than top_k was gathered for the left-out one; where nothing was
                # left out, drop the farthest, so every query is scored by exactly top_k centres.
                untouched = ~torch.isneginf(logits).any(1)
                logits = torch.cat(
                    [logits[:, :-1], logits[:, -1:].masked_fill(untouched[:, None], -math.inf)], 1
                )
            new_max = torch.maximum(run_max, logits.max(1).values)
            safe = _safe(new_max)
            rescale = (run_max - safe).exp()
            w = (logits - safe[:, None]).exp()
            total = total * rescale + w.sum(1)
            score = score * rescale[:, None] + weighted_g(w)
            if need_div:
                div = div * rescale + (w * q).sum(1)
            run_max = new_max
        score = score / total[:, None]
        if need_div:
            div = div / total
        return total.log() + run_max, score, div

    def _by_sigma(self, x: Tensor, sigma: Tensor | float, fn) -> list[tuple[Tensor, tuple]]:
        flat = x.reshape(x.shape[0], -1).to(self.points.dtype)
        sig = as_sigma_batch(sigma, flat)
        out = []
        for value in torch.unique(sig):
            rows = (sig == value).nonzero().squeeze(1)
            out.append((rows, fn(flat[rows], float(value))))
        return out

    # ------------------------------------------------------------------ public API
    def log_density(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``log rho_sigma(x)`` (B,) of the noised mixture (normalised)."""
        res = torch.empty(x.shape[0], dtype=self.points.dtype, device=x.device)
        for rows, (lse, _, _) in self._by_sigma(x, sigma, self._accumulate):
            res = res.index_put((rows,), lse - math.log(self.num_points))
        return res

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``grad_x log rho_sigma(x)``, defined at ``sigma = 0`` too (every ``C_i`` is positive definite)."""
        flat = x.reshape(x.shape[0], -1)
        res = torch.empty(flat.shape, dtype=self.points.dtype, device=x.device)
        for rows, (_, s, _) in self._by_sigma(x, sigma, self._accumulate):
            res = res.index_put((rows,), s)
        return res.reshape(x.shape).to(x.dtype)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = append_dims(as_sigma_batch(sigma, x), x.ndim)
        return x + s**2 * self.score(x, sigma)

    @torch.no_grad()
    def sample_exact(self, shape: tuple[int, ...], generator=None, device=None) -> Tensor:
        """Draws of the data-time mixture ``(1/N) sum_i N(y_i, C_i)``: a centre, then its Gaussian.

        With precision factors (``P = D + U U^T``), ``x = y + P^{-1} (D^{1/2} z_1 + U z_2)`` has
        covariance ``P^{-1} P P^{-1} = C`` and ``P^{-1}`` is applied by Woodbury (an ``r x r`` solve);
        with covariance factors (``C = D^{-1} + W W^T``), ``x = y + D^{-1/2} z_1 + W z_2``.
        """
        n, d = shape[0], self.dim
        r = 0 if self.factors is None else self.rank
        z = normal_rows(n, 1 + d + r, generator, self.points.device).to(self.points.dtype)
        idx = pick_components(z[:, 0], None, self.num_points)
        y, p = self.points[idx], self._log_prec(idx).exp()
        z1, z2 = z[:, 1 : 1 + d], z[:, 1 + d :, None]
        if self.factors is None:
            x = y + z1 / p.sqrt()
        elif self.covariance_factors:
            x = y + z1 / p.sqrt() + (self.factors[idx] @ z2).squeeze(-1)
        else:
            u = self.factors[idx]
            v = (p.sqrt() * z1 + (u @ z2).squeeze(-1)) / p  # D^{-1} (D^{1/2} z_1 + U z_2)
            w = u / p[..., None]  # D^{-1} U
            k = torch.eye(r, dtype=u.dtype, device=u.device) + u.mT @ w
            x = y + v - (w @ torch.linalg.solve(k, u.mT @ v[..., None])).squeeze(-1)
        return x.reshape(shape).to(device or self.points.device)

    def score_and_divergence(
        self, x: Tensor, sigma: float = 0.0, exclude: Tensor | None = None, exclude_self: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The score (B, d) and its exact divergence (B,) at one ``sigma`` (flattened ``x``).

        With ``g_i = -S_i^{-1}(x - y_i)`` and ``s = sum_i w_i g_i``, ``grad w_i = w_i (g_i - s)``, so
        ``div s = sum_i w_i (|g_i|^2 - tr S_i^{-1}) - |s|^2``.
        """
        flat = x.reshape(x.shape[0], -1).to(self.points.dtype)
        _, s, q = self._accumulate(flat, float(sigma), exclude, need_div=True, exclude_self=exclude_self)
        return s, q - (s**2).sum(1)

    def hyvarinen(
        self, x: Tensor, sigma: float = 0.0, exclude: Tensor | None = None, exclude_self: bool = False
    ) -> Tensor:
        """Per-point implicit score-matching loss ``1/2 |s|^2 + div s`` (B,)."""
        s, div = self.score_and_divergence(x, sigma, exclude, exclude_self)
        return 0.5 * (s**2).sum(1) + div


def loo_objective(
    kernel: KernelScore, idx: Tensor | None = None, sigma: float = 0.0, loo: bool = True
) -> Tensor:
    """Mean Hyvarinen loss over training points ``idx`` (all when None), each left out of its own mixture."""
    if idx is None:
        idx = torch.arange(kernel.num_points, device=kernel.points.device)
    x = kernel.points[idx]
    return kernel.hyvarinen(x, sigma, exclude=idx if loo else None).mean()
