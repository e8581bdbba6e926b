"""The local precision field of the kernel WPO model: a kernel centre ``y`` -> its precision ``P(y)``.

The reference implementation of Zhang et al. (arXiv 2402.06162) produces each centre's precision with
a small network of the centre, ``P(y) = L(y) L(y)^T + eps I`` (``L`` lower triangular, ``eps = 0.01``),
so neighbouring centres get similar precisions and the model has a fixed number of parameters however
many centres it carries. :class:`PrecisionField` offers that form (``"full"``) and cheaper ones for
high dimension, all returned in the factored form :class:`KernelScore` consumes. ``lowrank`` adds
precision along ``rank`` directions (it can only narrow a kernel); ``tangent`` adds *covariance*
along ``rank`` directions, so a kernel can be narrow in most directions and wide along a few: a local
tangent space of data on a manifold (images).

=============  ========================================================  =======================
form           ``P(y)``                                                  outputs per centre
=============  ========================================================  =======================
``full``       ``floor I + L L^T``, ``L`` lower triangular                ``d (d + 1) / 2``
``lowrank``    ``diag(floor + exp(a)) + U U^T``, ``U`` of ``rank`` cols   ``d + d rank``
``tangent``    ``P^{-1} = diag(2 floor + exp(a))^{-1} + W W^T``            ``d + d rank``
``diagonal``   ``diag(floor + exp(a))``                                  ``d``
``isotropic``  ``(floor + exp(a)) I``                                    ``1``
=============  ========================================================  =======================

Every form keeps each kernel's covariance at most ``1 / floor`` along any direction. For ``tangent``
the diagonal part is held below half of that and ``W`` is shrunk smoothly,
``W = W_raw sqrt(c / (c + |W_raw|_F^2))`` with ``c = 1 / (2 floor)``, so ``|W W^T| <= |W|_F^2 < c``.

``amortized=False`` replaces the network by one learned output shared by every centre (a tied
precision: a cross-validated bandwidth or metric).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_diff.errors import ConfigError

FORMS = ("full", "lowrank", "tangent", "diagonal", "isotropic")


class PrecisionField(nn.Module):
    """``forward(y: (M, d)) -> (log_diag (M, 1 or d), factors (M, d, r) or None)`` with
    ``P(y) = diag(exp(log_diag)) + factors factors^T``.

    Args:
        data_shape: the shape of one sample; ``d`` is its number of elements.
        form: ``full``, ``lowrank``, ``diagonal`` or ``isotropic`` (see the module docstring).
        rank: columns of ``U`` for ``lowrank``.
        floor: the smallest precision along any direction (the reference code's ``eps``): no kernel's
            covariance exceeds ``1 / floor`` along any direction, in every form. Must be positive
            for ``full``.
        amortized: a network of the centre (True) or one shared learned output (False).
        hidden_dim, num_layers: the network's width and number of hidden layers (GELU).
        seed: seeds the initial factors, so two fields built alike are equal.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        form: str = "full",
        rank: int = 4,
        floor: float = 0.01,
        amortized: bool = True,
        hidden_dim: int = 64,
        num_layers: int = 3,
        seed: int = 0,
    ):
        super().__init__()
        if form not in FORMS:
            raise ConfigError(f"net.form={form!r} is not one of {', '.join(FORMS)}")
        if form == "full" and floor <= 0:
            raise ConfigError("net.floor must be positive with net.form=full (it keeps P invertible)")
        if floor < 0:
            raise ConfigError(f"net.floor={floor} must be >= 0")
        self.dim = d = math.prod(data_shape)
        self.form, self.amortized = form, bool(amortized)
        # A buffer, so that a floor raised to fit the data (raise_floor) travels with checkpoints.
        self.register_buffer("floor_value", torch.tensor(float(floor)))
        self.rank = d if form == "full" else int(rank) if form in ("lowrank", "tangent") else 0
        if form in ("lowrank", "tangent") and not 1 <= self.rank <= d:
            raise ConfigError(f"net.rank={rank} must be in [1, {d}] for data of dimension {d}")
        self.diag_width = {"full": 0, "lowrank": d, "tangent": d, "diagonal": d, "isotropic": 1}[form]
        self.out_dim = self.diag_width + (d * (d + 1) // 2 if form == "full" else d * self.rank)
        self.seed = int(seed)
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))
        if self.amortized:
            layers: list[nn.Module] = []
            width = d
            for _ in range(num_layers):
                layers += [nn.Linear(width, hidden_dim), nn.GELU()]
                width = hidden_dim
            layers.append(nn.Linear(width, self.out_dim))
            self.body = nn.Sequential(*layers)
            self.shared = None
        else:
            self.body = None
            self.shared = nn.Parameter(torch.zeros(self.out_dim))
        if form == "full":
            self.register_buffer("tril", torch.tril_indices(d, d), persistent=False)
        self.initialise(bandwidth=1.0)

    @property
    def floor(self) -> float:
        return float(self.floor_value)

    @torch.no_grad()
    def raise_floor(self, value: float) -> None:
        """Raise the floor to ``value`` if it is lower (e.g. to the inverse data variance, so that no
        kernel is wider than the data along any direction)."""
        self.floor_value.fill_(max(self.floor, float(value)))

    @property
    def diag_floor(self) -> float:
        """The floor of the diagonal precision: ``floor``, or twice it for ``tangent``, whose factors
        may add up to the other half of the variance ceiling."""
        return 2 * self.floor if self.form == "tangent" else self.floor

    @property
    def kernel_precision(self) -> str:
        """The :class:`KernelScore` precision kind these outputs describe."""
        if self.form in ("full", "lowrank", "tangent"):
            return "lowrank"
        return self.form

    @property
    def covariance_factors(self) -> bool:
        """Whether the factors add covariance (``tangent``) rather than precision."""
        return self.form == "tangent"

    @torch.no_grad()
    def initialise(self, bandwidth: float, data: Tensor | None = None) -> None:
        """Start every centre at ``P = I / bandwidth^2`` (factors small and random for ``lowrank``).

        ``data`` (N, ...) sets the standardisation of the network's input. The last layer's weights
        are scaled down so the field starts almost constant and the fit moves it from there.
        """
        if data is not None:
            flat = data.reshape(data.shape[0], -1).to(self.shift)
            self.shift.copy_(flat.mean(0))
            self.scale.copy_(flat.std(0).clamp_min(1e-3 * flat.std(0).max().clamp_min(1e-12)))
        target = 1.0 / float(bandwidth) ** 2
        gen = torch.Generator().manual_seed(self.seed)
        bias = torch.zeros(self.out_dim)
        d, k = self.dim, self.diag_width
        if self.form == "full":
            rows, cols = torch.tril_indices(d, d)
            bias[rows == cols] = math.sqrt(max(target - self.floor, 1e-6 * target))
        else:
            bias[:k] = math.log(max(target - self.diag_floor, 1e-6 * target))
            if self.form in ("lowrank", "tangent"):
                noise = torch.randn(d * self.rank, generator=gen)
                scale = target if self.form == "lowrank" else 1 / target  # a precision or a variance
                bias[k:] = noise * 0.1 * math.sqrt(scale / self.rank)
        if self.amortized:
            last = self.body[-1]
            last.weight.mul_(0.01)
            last.bias.copy_(bias)
        else:
            self.shared.copy_(bias)

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        flat = y.reshape(y.shape[0], -1)
        m, d = flat.shape[0], self.dim
        if self.amortized:
            out = self.body((flat.to(self.shift) - self.shift) / self.scale)
        else:
            out = self.shared.expand(m, self.out_dim)
        if self.form == "full":
            chol = out.new_zeros(m, d, d)
            chol[:, self.tril[0], self.tril[1]] = out
            log_diag = self.floor_value.log().to(out).expand(m, 1)
            return log_diag, chol
        raw = out[:, : self.diag_width]
        floor = self.floor_value * (2 if self.form == "tangent" else 1)
        log_diag = torch.logaddexp(raw, floor.log().to(raw)) if self.floor > 0 else raw
        if self.form not in ("lowrank", "tangent"):
            return log_diag, None
        factors = out[:, self.diag_width :].reshape(m, d, self.rank)
        if self.form == "tangent" and self.floor > 0:
            budget = 1 / floor.to(factors)  # the covariance W W^T may add: |W W^T| <= |W|_F^2 < budget
            factors = factors * (budget / (budget + factors.square().sum((1, 2), keepdim=True))).sqrt()
        return log_diag, factors

    def precision_matrices(self, y: Tensor) -> Tensor:
        """The (M, d, d) precisions at centres ``y`` (for inspection and small dimensions)."""
        log_diag, factors = self.forward(y)
        if self.covariance_factors:
            cov = torch.diag_embed((-log_diag).exp().expand(-1, self.dim)) + factors @ factors.mT
            return torch.linalg.inv(cov)
        out = torch.diag_embed(log_diag.exp().expand(-1, self.dim))
        return out if factors is None else out + factors @ factors.mT
