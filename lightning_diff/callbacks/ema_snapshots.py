"""Post-hoc EMA: power-function EMA profiles kept while training, any EMA length rebuilt afterwards.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (arXiv
2312.02696), Sec. 3 and App. C.1-C.2. The callback :class:`PosthocEMA` keeps a few power-function
averages of the weights and writes them to disk every ``every_n_steps`` optimiser steps;
:func:`reconstruct` later combines those snapshots into the average of any other width.

**The profile.** A power-function EMA at training time ``t`` weighs the past weights by
``p_t(u) = (gamma + 1) u^gamma / t^(gamma + 1)`` on ``0 <= u <= t`` (Sec. 3). In ``x = u / t``
this is the Beta(gamma + 1, 1) density, whose mean is ``(gamma + 1) / (gamma + 2)`` and variance
``(gamma + 1) / ((gamma + 2)^2 (gamma + 3))``; the paper names the width by its standard deviation
relative to ``t``:

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),

so ``gamma`` solves the cubic ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0`` with
``s = sigma_rel^-2``. As a function of ``gamma > -1``, ``sigma_rel`` rises from 0 to its largest value
:data:`SIGMA_REL_MAX` ~ 0.3003 at ``gamma = (sqrt 5 - 3) / 2`` (where ``1/(g+1) = 2/(g+2) + 1/(g+3)``)
and falls back to 0; :func:`sigma_rel_to_gamma` takes the root on the falling branch (the largest
root), e.g. sigma_rel 0.05 -> gamma 16.97 and 0.10 -> 6.94 (the paper's values).

**The discrete update** (App. C.1): after optimiser step ``t = 1, 2, ...``, with ``theta_t`` the
weights after that step,

    hat_theta_t = beta_t hat_theta_{t-1} + (1 - beta_t) theta_t,    beta_t = (1 - 1/t)^(gamma + 1).

``beta_1 = 0``, so the initial value does not count. Unrolled, ``hat_theta_t = sum_{tau <= t}
w_t(tau) theta_tau`` with ``prod_{s = tau+1..t} beta_s = (tau / t)^(gamma + 1)`` (the product
telescopes), hence

    w_t(tau) = (tau^(gamma + 1) - (tau - 1)^(gamma + 1)) / t^(gamma + 1)
             = integral of p_t(u) over (tau - 1, tau]:

each step carries exactly the mass the continuous profile gives its unit interval, and the weights
sum to 1. :func:`profile_weights` evaluates them as ``(tau/t)^(gamma+1) (1 - (1 - 1/tau)^(gamma+1))``
(``expm1``/``log1p``, without the cancellation of the difference).

**Reconstruction** (App. C.2). Snapshot ``i`` (profile ``gamma_i`` at step ``t_i``) is
``sum_tau w_i(tau) theta_tau``; so is the wanted average ``w_r`` (target ``gamma_r`` at step
``t_r``). The least-squares combination ``x = argmin || sum_i x_i w_i - w_r ||^2`` over the weighting
functions solves the normal equations ``A x = b``, ``A_ij = <w_i, w_j>``, ``b_i = <w_i, w_r>``, and
then ``sum_i x_i hat_theta_i`` is the reconstruction. The paper computes the inner products of the
continuous profiles in closed form, ``(g_i+1)(g_j+1) m^(g_i+g_j+1) / ((g_i+g_j+1) t_i^(g_i+1)
t_j^(g_j+1))`` with ``m = min(t_i, t_j)``. Here they are sums over the integer step grid
``tau = 1 .. max(t_i, t_r)`` of the discrete weights above (:func:`posthoc_coefficients`), computed
in float64 in chunks: exact for the averages the callback actually tracks, short runs included,
where the continuous form is off by O(1/t). A target equal to one of the snapshots' profiles is
reproduced to rounding. :func:`reconstruct` returns the relative residual
``||sum_i x_i w_i - w_r|| / ||w_r||`` with the weights.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from lightning_diff.checkpoints import AtomicCheckpointIO
from lightning_diff.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

#: ``gamma`` at which ``sigma_rel`` is largest: the root of ``gamma^2 + 3 gamma + 1 = 0`` above -1.
GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0


def gamma_to_sigma_rel(gamma: float) -> float:
    """``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``, for ``gamma > -1``."""
    if not gamma > -1.0:
        raise ConfigError(f"gamma={gamma}: a power-function EMA needs gamma > -1")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


#: The widest power-function EMA: sigma_rel at ``GAMMA_AT_MAX`` (about 0.3003).
SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_MAX)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the profile of relative width ``sigma_rel`` (the largest root of the
    cubic in the module docstring), found by bisection on ``[GAMMA_AT_MAX, 1 / sigma_rel]``, where
    ``sigma_rel(gamma)`` falls; ``sigma_rel(gamma) < 1 / (gamma + 2)`` bounds the root above."""
    sigma_rel = float(sigma_rel)
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(
            f"sigma_rel={sigma_rel} is out of range: a power-function EMA has 0 < sigma_rel < "
            f"{SIGMA_REL_MAX:.4f} (0.05-0.2 are the useful ones)"
        )
    lo, hi = GAMMA_AT_MAX, 1.0 / sigma_rel
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # adjacent floats: converged
            return mid
        if gamma_to_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid


def power_ema_beta(step: int, gamma: float) -> float:
    """``beta_t = (1 - 1/t)^(gamma + 1)``: the decay of the update after optimiser step ``t >= 1``."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def _grid_columns(taus: np.ndarray, steps: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """``w_{t_j}(tau_i)`` for every grid step ``tau_i`` (rows) and profile ``(t_j, gamma_j)`` (columns)."""
    tau = taus.astype(np.float64)[:, None]
    g1 = (gammas.astype(np.float64) + 1.0)[None, :]
    t = steps.astype(np.float64)[None, :]
    later = np.maximum(tau, 2.0)  # tau = 1 takes the whole (1/t)^(gamma+1): the factor below is 1
    tail = np.where(tau > 1.0, -np.expm1(g1 * np.log1p(-1.0 / later)), 1.0)
    head = np.exp(g1 * np.minimum(np.log(tau) - np.log(t), 0.0))  # tau > t: masked below
    return np.where(tau <= t, head * tail, 0.0)


def profile_weights(step: int, gamma: float) -> np.ndarray:
    """``w_t(tau)`` for ``tau = 1 .. t``: the weight of the weights after step ``tau`` in the
    power-function EMA after step ``t`` (float64; sums to 1)."""
    return _grid_columns(np.arange(1, step + 1), np.array([step]), np.array([gamma]))[:, 0]


def posthoc_coefficients(
    snapshots: Sequence[tuple[int, float]], target_step: int, target_gamma: float, chunk: int = 8192
) -> tuple[np.ndarray, float]:
    """Coefficients ``x`` of the least-squares combination of ``snapshots`` (``(t_i, gamma_i)`` pairs)
    that best matches the profile ``(target_step, target_gamma)``, and the relative residual
    ``||sum_i x_i w_i - w_r|| / ||w_r||``. Inner products are sums over the integer step grid
    (module docstring); the normal equations are solved by ``numpy.linalg.lstsq`` (SVD, the
    minimum-norm solution where snapshots are nearly collinear)."""
    if not snapshots:
        raise ValueError("posthoc_coefficients needs at least one snapshot")
    steps = np.array([int(s) for s, _ in snapshots] + [int(target_step)], dtype=np.int64)
    gammas = np.array([float(g) for _, g in snapshots] + [float(target_gamma)])
    if steps.min() < 1:
        raise ValueError(f"snapshot and target steps must be >= 1, got {steps.min()}")
    n = len(snapshots)
    gram = np.zeros((n + 1, n + 1))
    for start in range(1, int(steps.max()) + 1, chunk):
        columns = _grid_columns(np.arange(start, min(start + chunk, int(steps.max()) + 1)), steps, gammas)
        gram += columns.T @ columns
    a, b, c = gram[:n, :n], gram[:n, n], gram[n, n]
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    residual = max(float(x @ a @ x - 2.0 * x @ b + c), 0.0)
    return x, math.sqrt(residual / c)


# ---- snapshots on disk ----------------------------------------------------------------------------
SNAPSHOT_NAME = re.compile(r"^step(\d+)\.pt$")


def snapshot_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step{step:07d}.pt"


def read_snapshot(path: Path, mmap: bool = True) -> dict[str, Any]:
    """A snapshot file's contents (tensors memory-mapped), checked; :class:`CheckpointError` if not one."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch reports truncated or garbled files with many exception types
        raise CheckpointError(
            f"post-hoc EMA snapshot {path} is corrupt or unreadable ({type(err).__name__})"
        ) from err
    profiles = content.get("profiles") if isinstance(content, dict) else None
    if not isinstance(profiles, list) or not profiles or "step" not in content:
        raise CheckpointError(f"{path} is not a post-hoc EMA snapshot (no step and profiles)")
    return content


def list_snapshots(directory: str | Path, max_step: int | None = None) -> list[tuple[int, Path]]:
    """``(step, path)`` of the snapshot files in ``directory``, by step, up to ``max_step``."""
    found = []
    for path in Path(directory).glob("step*.pt"):
        match = SNAPSHOT_NAME.match(path.name)
        if match and (max_step is None or int(match.group(1)) <= max_step):
            found.append((int(match.group(1)), path))
    return sorted(found)


def reconstruct(
    directory: str | Path, sigma_rel: float, step: int
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The power-function EMA of width ``sigma_rel`` at optimiser step ``step``, rebuilt from the
    snapshots in ``directory`` taken at or before ``step``.

    Returns the floating-point tensors (float64; integer entries are the latest snapshot's) and a
    summary: ``sigma_rel``, ``gamma``, ``step``, ``snapshot_steps``, ``coefficients``, the relative
    residual of the fit (module docstring) and ``start_step`` (above 0 when the profiles started
    mid-run: they then average weights held at their step-``start_step`` value before it).
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    files = list_snapshots(directory, step)
    if not files:
        raise CheckpointError(
            f"no post-hoc EMA snapshots at or before step {step} in {directory}: train with "
            "callbacks=with_posthoc_ema, or pass snapshots=DIR"
        )
    columns: list[tuple[int, float]] = []
    start_steps = set()
    for file_step, path in files:
        content = read_snapshot(path)
        if int(content["step"]) != file_step:
            raise CheckpointError(f"{path} holds step {content['step']}, not the step in its name")
        columns += [(file_step, float(p["gamma"])) for p in content["profiles"]]
        start_steps.add(int(content.get("start_step", 0)))
    coefficients, residual = posthoc_coefficients(columns, step, gamma)
    total: dict[str, Tensor] = {}
    other: dict[str, Tensor] = {}
    index = 0
    for _, path in files:
        for profile in read_snapshot(path)["profiles"]:
            weight = float(coefficients[index])
            index += 1
            for name, value in profile["state_dict"].items():
                if not value.is_floating_point():
                    other[name] = value.clone()
                elif name not in total:
                    total[name] = value.double() * weight
                elif total[name].shape != value.shape:
                    raise CheckpointError(
                        f"{path}: {name} has shape {tuple(value.shape)}, other snapshots differ"
                    )
                else:
                    total[name].add_(value.double(), alpha=weight)
    info = {
        "sigma_rel": float(sigma_rel),
        "gamma": gamma,
        "step": int(step),
        "snapshot_steps": [s for s, _ in files],
        "coefficients": [float(c) for c in coefficients],
        "residual": residual,
        "start_step": max(start_steps),
    }
    return {**total, **other}, info


# ---- the callback ---------------------------------------------------------------------------------
class PosthocEMA(L.Callback):
    """Keep power-function EMA profiles of the network's weights and save snapshots of them.

    Args:
        out_dir: where the snapshots go (``<run_dir>/posthoc_ema``): ``step<step>.pt``, one file per
            snapshot step with every profile, written to a temporary file and renamed.
        sigma_rels: the profiles' relative widths (the paper keeps 0.05 and 0.10).
        every_n_steps: optimiser steps between snapshots; 0 saves only at the end of ``fit``.
        save_at_end: also save at the step ``fit`` ends at, when that is not a multiple of
            ``every_n_steps`` (so the final weights can be rebuilt exactly).

    The averaged tensors are ``pl_module.net.state_dict()``'s floating-point entries (parameters and
    float buffers; integer buffers are stored as they are), the keys of ``ema.module.*`` in a
    checkpoint. After optimiser step ``t`` (``trainer.global_step``) each profile takes
    ``lerp(hat_theta, theta, 1 - beta_t)``, one ``_foreach_lerp_`` per profile with ``beta_t`` computed
    on the host: no device synchronisation. The update runs in ``on_train_batch_end``, or earlier if
    another callback writes a checkpoint first in that hook (``state_dict`` catches up), so every
    checkpoint holds the profiles of its step and a resumed run continues them bit for bit.

    Under DDP every rank keeps the profiles (its weights are the same), and only rank 0 writes
    files; nothing here communicates. Each profile costs one copy of the weights in memory, in
    every checkpoint and in every snapshot file.
    """

    def __init__(
        self,
        out_dir: str | Path,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int = 1000,
        save_at_end: bool = True,
    ):
        self.out_dir = Path(out_dir)
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels:
            raise ConfigError("callbacks.posthoc_ema.sigma_rels is empty: give at least one width")
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if every_n_steps < 0:
            raise ConfigError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps} must be >= 0")
        self.every_n_steps = int(every_n_steps)
        self.save_at_end = bool(save_at_end)
        self.profiles: list[list[Tensor]] | None = None
        self.names: list[str] = []
        self.step = 0  # the optimiser step the profiles have seen
        self.start_step = 0
        self._saved_step: int | None = None
        self._loaded: dict[str, Any] | None = None
        self._fit_trainer: L.Trainer | None = None
        self._net: nn.Module | None = None

    @staticmethod
    def _floats(net: nn.Module) -> dict[str, Tensor]:
        return {k: v for k, v in net.state_dict().items() if v.is_floating_point()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            if not isinstance(getattr(pl_module, "net", None), nn.Module):
                raise ConfigError("callbacks.posthoc_ema averages pl_module.net: this model has no net")
            self._fit_trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._net = pl_module.net
        current = self._floats(self._net)
        self.names = list(current)
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            if trainer.global_step > 0:
                log.warning(
                    "post-hoc EMA starts at step %d (no profiles in the checkpoint): its averages treat "
                    "the weights before that step as equal to the weights at it",
                    trainer.global_step,
                )
            self.profiles = [[v.detach().clone() for v in current.values()] for _ in self.gammas]
            self.step = self.start_step = trainer.global_step
            return
        if loaded["names"] != self.names:
            raise CheckpointError("the checkpoint's post-hoc EMA profiles do not match the network's tensors")
        self.profiles = [
            [saved[n].to(device=v.device, dtype=v.dtype).clone() for n, v in current.items()]
            for saved in loaded["profiles"]
        ]
        self.step, self.start_step = int(loaded["step"]), int(loaded["start_step"])
        if self.step != trainer.global_step:
            raise CheckpointError(
                f"the checkpoint's post-hoc EMA profiles are at step {self.step}, its weights at step "
                f"{trainer.global_step}"
            )

    def _catch_up(self) -> None:
        """Apply the update of the step just taken, if not applied yet."""
        trainer, net = self._fit_trainer, self._net
        if self.profiles is None or trainer is None or net is None or trainer.global_step <= self.step:
            return
        t = trainer.global_step
        current = list(self._floats(net).values())
        with torch.no_grad():
            for profile, gamma in zip(self.profiles, self.gammas, strict=True):
                torch._foreach_lerp_(profile, current, 1.0 - power_ema_beta(t, gamma))
        self.step = t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._catch_up()
        if self.every_n_steps and self.step % self.every_n_steps == 0:
            self._save_snapshot(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_at_end:
            self._save_snapshot(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._fit_trainer = self._net = None

    def _save_snapshot(self, trainer: L.Trainer) -> None:
        if self.profiles is None or self.step == 0 or self._saved_step == self.step:
            return
        self._saved_step = self.step
        if not trainer.is_global_zero:
            return
        integers = {k: v.cpu() for k, v in self._net.state_dict().items() if not v.is_floating_point()}
        content = {
            "step": self.step,
            "start_step": self.start_step,
            "profiles": [
                {
                    "sigma_rel": s,
                    "gamma": g,
                    "state_dict": {**dict(zip(self.names, (v.cpu() for v in p), strict=True)), **integers},
                }
                for s, g, p in zip(self.sigma_rels, self.gammas, self.profiles, strict=True)
            ],
        }
        AtomicCheckpointIO().save_checkpoint(content, snapshot_path(self.out_dir, self.step))

    def state_dict(self) -> dict[str, Any]:
        if self.profiles is None:
            return {}
        self._catch_up()  # a checkpoint written before this callback's on_train_batch_end
        return {
            "sigma_rels": list(self.sigma_rels),
            "names": list(self.names),
            "step": self.step,
            "start_step": self.start_step,
            "profiles": [{n: v.detach().cpu().clone() for n, v in zip(self.names, p, strict=True)}
                         for p in self.profiles],
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if [float(s) for s in state_dict["sigma_rels"]] != self.sigma_rels:
            raise ConfigError(
                f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels} differ from the checkpoint's "
                f"{state_dict['sigma_rels']}: resume with the same widths"
            )
        self._loaded = state_dict
