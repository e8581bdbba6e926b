"""Lightning callbacks that sample from the model during training and record what they see."""

from lightning_diff.callbacks.evaluation import SampleEvaluation
from lightning_diff.callbacks.likelihood import ODELikelihood
from lightning_diff.callbacks.sample_grid import SampleGrid

__all__ = ["ODELikelihood", "SampleEvaluation", "SampleGrid"]
