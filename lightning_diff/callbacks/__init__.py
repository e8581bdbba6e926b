"""Lightning callbacks that sample from the model during training and record what they see."""

from lightning_diff.callbacks.best_weights import BestWeights
from lightning_diff.callbacks.checkpoint import RunCheckpoint
from lightning_diff.callbacks.ema_snapshots import PosthocEMA
from lightning_diff.callbacks.evaluation import SampleEvaluation
from lightning_diff.callbacks.gaussian_deviation import GaussianScoreDeviation
from lightning_diff.callbacks.ode_likelihood import ODELikelihood
from lightning_diff.callbacks.preemption import PreemptionCheckpoint
from lightning_diff.callbacks.sample_grid import SampleGrid

__all__ = [
    "BestWeights",
    "GaussianScoreDeviation",
    "ODELikelihood",
    "PosthocEMA",
    "PreemptionCheckpoint",
    "RunCheckpoint",
    "SampleEvaluation",
    "SampleGrid",
]
