"""The WPO-informed kernel score family (Zhang, Liu, Li, Katsoulakis & Osher 2024, arXiv 2402.06162).

The paper's mean-field-game reading of score-based generation makes the score at every noise level
the score of a heat-smoothed terminal (data-time) density; its kernel model takes that density to be
a Gaussian mixture centred at training points with learned local precisions, and learns the
precisions from the MFG's terminal condition by implicit score matching. Here:

* ``rho_0(x) = (1/M) sum_i N(x; y_i, P(y_i)^{-1})`` over ``M`` centres ``y_i`` (all training points,
  or a seeded subset of ``num_centers``); ``P`` is a :class:`~lightning_diff.nets.PrecisionField`
  (the ``net`` of this family);
* ``rho_sigma`` adds ``sigma^2 I`` to every component covariance (the heat flow, exact), so the
  denoiser ``D(x, sigma) = x + sigma^2 grad log rho_sigma(x)`` is in closed form at every sigma and
  every sampler of the package applies unchanged
  (:class:`~lightning_diff.diffusion.kernel_score.KernelScore`);
* training minimises Hyvarinen's objective ``1/2 |grad log rho_0|^2 + Laplacian log rho_0`` over
  training batches, each point scored by the mixture *without any component centred on itself*. With
  centres = all points this is leave-one-out; with a subset, points that are not centres are scored by
  every centre, which is the reference code's split of kernel centres and score-matching samples.

Training time is spent only on the precisions; nothing is learned per noise level. Sampling grids
come from a variance-preserving :class:`DiscreteSchedule`, as for the analytic families, so step
counts compare one to one with ``model=ddpm``. See ``docs/kernel_wpo.md`` for what follows the paper
and what is our choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.kernel_bandwidth import isotropic_objective, isotropic_optimum
from lightning_diff.diffusion.kernel_score import KernelScore, scott_bandwidth
from lightning_diff.diffusion.samplers import Sampler
from lightning_diff.diffusion.schedules import DiscreteSchedule
from lightning_diff.errors import ConfigError
from lightning_diff.models.diffusion_module import DiffusionModule
from lightning_diff.nets.precision import PrecisionField

LOO_POINTS = 4096  # training points scoring the initial width's 1-D search
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class KernelWPO(DiffusionModule):
    """Kernel score model: Gaussian kernels at the training points with a learned precision field.

    Args:
        net: the :class:`PrecisionField` (built from ``conf/net/precision_field.yaml``).
        num_centers: kernel centres drawn from the training set (seeded); all of it when None.
        center_seed: seeds that draw.
        bandwidth: the initial kernel standard deviation: ``loo`` (the default) the width of one shared
            isotropic kernel that minimises this family's own objective on the training set (a 1-D
            search, :func:`~lightning_diff.diffusion.kernel_bandwidth.isotropic_optimum`), so the fit
            starts at the best kernel density of the isotropic family and only has to improve on it;
            ``scott`` (or None) Scott's rule; or a number.
        chunk_size: centres per chunk of the running log-sum-exp (memory ``batch x chunk x d``).
        top_k: score each query with its ``top_k`` nearest centres only (an approximation; the error
            is measured by ``bench/kernel_wpo.py``); all centres when None.
        dtype: ``float64`` (default: the loss has cancelling terms) or ``float32``.
        max_variance: no kernel is wider than this along any direction (the precision field's floor is
            raised to its inverse): ``data`` (the training set's mean per-coordinate variance), a
            number, or None (the field's own floor only). Without it, a few centres can stretch one
            kernel along the line through a neighbour, far beyond the data (seen with 32 points).
        fit_sigma: the noise level at which the objective is evaluated: the mixture smoothed by
            ``fit_sigma^2 I``. Data on a lower-dimensional manifold (a circle, images) have no density,
            and at 0 the objective then rewards precisions across the manifold without bound; a small
            positive value (the smallest noise level a sampler visits) caps them at ``1 / fit_sigma^2``.
        schedule: the :class:`DiscreteSchedule` giving sampling grids.
        The rest as in :class:`DiffusionModule`.
    """

    def __init__(
        self,
        net: PrecisionField,
        num_centers: int | None = None,
        center_seed: int = 0,
        bandwidth: float | str | None = "loo",
        chunk_size: int = 1024,
        top_k: int | None = None,
        dtype: str = "float64",
        fit_sigma: float = 0.01,
        max_variance: str | float | None = "data",
        schedule: DiscreteSchedule | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_warmup_steps: int = 0,
        ema_decay: float = 0.0,
        ema_warmup: bool = False,
        sampler: Sampler | None = None,
        clip_denoised: bool = False,
    ):
        if not isinstance(net, PrecisionField):
            raise ConfigError("model=kernel_wpo needs net=precision_field (its net is the precision field)")
        if dtype not in DTYPES:
            raise ConfigError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if num_centers is not None and num_centers < 2:
            raise ConfigError(f"model.num_centers={num_centers} must be at least 2 (or null for all points)")
        super().__init__(net, optimizer, lr_warmup_steps, ema_decay, ema_warmup, sampler, clip_denoised)
        self.schedule = schedule or DiscreteSchedule()
        self.num_centers, self.center_seed, self.bandwidth = num_centers, center_seed, bandwidth
        self.chunk_size, self.top_k, self.dtype_name = chunk_size, top_k, dtype
        if fit_sigma < 0:
            raise ConfigError(f"model.fit_sigma={fit_sigma} must be >= 0")
        self.fit_sigma = float(fit_sigma)
        if not (max_variance in (None, "data") or float(max_variance) > 0):
            raise ConfigError(f"model.max_variance={max_variance!r}: use data, null or a positive number")
        self.max_variance = max_variance
        if not (bandwidth in (None, "loo", "scott") or (not isinstance(bandwidth, str) and bandwidth > 0)):
            raise ConfigError(f"model.bandwidth={bandwidth!r}: use loo, scott or a positive number")
        self.register_data_buffer("centers")
        # The initial width and the isotropic objective there (with bandwidth=loo: the optimum the fit
        # starts from), kept in checkpoints so a fitted model can be read against its start.
        self.register_data_buffer("initial_bandwidth")
        self.register_data_buffer("initial_objective")

    def fit_data(self, train: Tensor, gaussian_reference: bool = True) -> None:
        """Choose the kernel centres and start the precision field at the initial bandwidth."""
        super().fit_data(train, gaussian_reference)
        flat = train.reshape(train.shape[0], -1)
        n = flat.shape[0]
        if self.num_centers is not None and self.num_centers < n:
            gen = torch.Generator().manual_seed(self.center_seed)
            idx = torch.randperm(n, generator=gen)[: self.num_centers].sort().values
            flat = flat[idx]
        if flat.shape[0] < 2:
            raise ConfigError("model=kernel_wpo needs at least two training points")
        self.centers = flat.to(device=self.device, dtype=DTYPES[self.dtype_name])
        h, start = self._initial_bandwidth(train, self.centers)
        self.initial_bandwidth = torch.tensor([h], dtype=torch.float64, device=self.device)
        self.initial_objective = torch.tensor([start], dtype=torch.float64, device=self.device)
        if self.max_variance is not None:
            cap = self.max_variance
            if cap == "data":
                cap = train.reshape(train.shape[0], -1).double().var(0).mean().item()
            self.net.raise_floor(1.0 / float(cap))
        self.net.initialise(h, data=train.to(self.device))
        self.ema.module.load_state_dict(self.net.state_dict())
        self.data_changed()

    def _initial_bandwidth(self, train: Tensor, centers: Tensor) -> tuple[float, float]:
        """The initial kernel width and the objective of that isotropic kernel on (up to 4096 of) the
        training points."""
        points = train.reshape(train.shape[0], -1).to(centers)
        if points.shape[0] > LOO_POINTS:
            gen = torch.Generator().manual_seed(self.center_seed)
            points = points[torch.randperm(points.shape[0], generator=gen)[:LOO_POINTS].to(points.device)]
        if self.bandwidth == "loo":
            return isotropic_optimum(centers, points, self.fit_sigma)
        h = scott_bandwidth(train) if self.bandwidth in (None, "scott") else float(self.bandwidth)
        return h, isotropic_objective(centers, points, h, self.fit_sigma)

    def kernel(self, field: PrecisionField) -> KernelScore:
        """The kernel score model with ``field``'s precisions (gradients flow when enabled)."""
        if self.centers.numel() == 0:
            raise ConfigError("model=kernel_wpo has not been fitted: train it with ld-train first")
        log_diag, factors = field(self.centers.to(field.shift.dtype))
        return KernelScore(
            self.centers,
            field.kernel_precision,
            chunk_size=self.chunk_size,
            top_k=self.top_k,
            log_prec=log_diag,
            factors=factors,
            dtype=self.centers.dtype,
            covariance_factors=field.covariance_factors,
        )

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._denoisers.clear()  # they hold the precisions of the previous step

    def make_denoiser(self, net: PrecisionField) -> Denoiser:
        with torch.no_grad():
            return self.kernel(net)

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-point Hyvarinen loss of the mixture at ``fit_sigma``, self-centred components left out."""
        return self.kernel(self.net).hyvarinen(batch, self.fit_sigma, exclude_self=True).to(batch.dtype)
