"""How far a learned score is from reference scores, noise level by noise level.

Wang & Vastola 2024 (arXiv 2412.09726) find that at moderate and high noise a trained diffusion
model's score is almost the score of the Gaussian fitted to the training set, and that this part is
learned early. For points ``x0`` (the paper uses the training points) and ``x = x0 + sigma n`` we
measure the explained fraction as the authors do, per sample and then averaged,

    ``ev(sigma) = 1 - E[ ||s_theta(x, sigma) - s_ref(x, sigma)||^2 / ||s_theta(x, sigma)||^2 ]``,

and ``deviation = 1 - ev``: the squared error normalised by the *model's* score norm. Beside it,
``pooled_deviation = E||s_theta - s_ref||^2 / E||s_theta||^2`` (a ratio of sums, which weights
samples by their score norm; earlier versions reported only this) and ``relative_error =
E||s_theta - s_ref||^2 / E||s_ref||^2``, normalised by the *reference's* norm instead.

References are any :class:`~lightning_diff.diffusion.denoisers.Denoiser` (the Gaussian, a Gaussian
mixture, the exact training-set score...), so each is compared by the same code.

Scores are compared in the variance-exploding coordinates of the denoiser interface. The ratios do
not change under the variance-preserving rescaling ``z = alpha x``: both scores become
``s / alpha`` with the same ``alpha``, which cancels between numerator and denominator.

States are float64 sums over samples, reduced by ``sum`` across processes, so the value does not
depend on how the samples were split between updates or ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_diff.diffusion.denoisers import Denoiser
from lightning_diff.diffusion.random import SampleGenerators, randn


def _score(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    """``(D(x, sigma) - x) / sigma^2`` flattened to (B, dim), in float64."""
    denoised = denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype))
    return (denoised.double() - x.double()).reshape(x.shape[0], -1) / sigma**2


class ScoreDeviation(Metric):
    """Per noise level and per named reference, the model score's deviation from the reference score.

    ``sigmas`` is the noise grid; ``references`` maps names to reference denoisers (kept as
    submodules, so they follow the metric's device). ``update(model, x0, generator)`` noises ``x0``
    at every ``sigma`` in turn with noise from ``generator`` (a ``torch.Generator`` or
    :class:`~lightning_diff.diffusion.random.SampleGenerators`, drawn once per sigma in grid order)
    and adds ``||s_theta - s_ref||^2``, ``||s_theta||^2``, ``||s_ref||^2`` and the per-sample ratio
    ``||s_theta - s_ref||^2 / ||s_theta||^2`` to the sums.

    ``compute()`` returns ``{name: {"ev", "deviation", "pooled_deviation", "relative_error"}}``,
    float64 tensors (S,) over the grid (see the module docstring for which normalisation is which).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, sigmas: Sequence[float], references: Mapping[str, Denoiser], **kwargs):
        super().__init__(**kwargs)
        if not references:
            raise ValueError("ScoreDeviation needs at least one reference denoiser")
        self.sigmas = [float(s) for s in sigmas]
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError(f"the noise grid must be non-empty and positive, got {self.sigmas}")
        self.names = list(references)
        self.references = nn.ModuleDict(dict(references))
        num_refs, num_sigmas = len(self.names), len(self.sigmas)
        zeros = torch.zeros(num_refs, num_sigmas, dtype=torch.float64)
        self.add_state("diff_sq", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("ref_sq", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("ratio_sum", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("model_sq", torch.zeros(num_sigmas, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(
        self, model: Denoiser, x0: Tensor, generator: torch.Generator | SampleGenerators | None = None
    ) -> None:
        x0 = x0.to(self.device)
        diff_sq, ref_sq, model_sq = self.diff_sq.clone(), self.ref_sq.clone(), self.model_sq.clone()
        ratio_sum = self.ratio_sum.clone()
        for j, sigma in enumerate(self.sigmas):
            x = x0 + sigma * randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
            s_model = _score(model, x, sigma)
            norms = s_model.pow(2).sum(1)
            model_sq[j] += norms.sum()
            for i, name in enumerate(self.names):
                s_ref = _score(self.references[name], x, sigma)
                errors = (s_model - s_ref).pow(2).sum(1)
                diff_sq[i, j] += errors.sum()
                ref_sq[i, j] += s_ref.pow(2).sum()
                ratio_sum[i, j] += (errors / norms).sum()
        self.diff_sq, self.ref_sq, self.model_sq, self.ratio_sum = diff_sq, ref_sq, model_sq, ratio_sum
        self.count = self.count + x0.shape[0]

    def compute(self) -> dict[str, dict[str, Tensor]]:
        if int(self.count) == 0:
            raise ValueError("ScoreDeviation.compute() before any update")
        deviation = self.ratio_sum / self.count
        pooled = self.diff_sq / self.model_sq
        relative = self.diff_sq / self.ref_sq
        return {
            name: {
                "ev": 1 - deviation[i],
                "deviation": deviation[i],
                "pooled_deviation": pooled[i],
                "relative_error": relative[i],
            }
            for i, name in enumerate(self.names)
        }
