"""LightningModules, one per model family, each a thin wiring around ``lightning_diff.diffusion``."""

from lightning_diff.models.ddpm import DDPM
from lightning_diff.models.diffusion_module import DiffusionModule
from lightning_diff.models.kernel_wpo import KernelWPO
from lightning_diff.models.score_sde import ScoreSDE

__all__ = ["DDPM", "DiffusionModule", "KernelWPO", "ScoreSDE"]
