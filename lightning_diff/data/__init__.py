"""DataModules that yield unlabeled samples in data space, and synthetic distributions.

Every DataModule derives from :class:`DiffusionDataModule` and yields float32 batches
``(B, *data_shape)``; images are scaled to ``[-1, 1]``.
"""

from lightning_diff.data.array import ArrayDataModule, load_array
from lightning_diff.data.datamodule import DiffusionDataModule, per_device_batch_size
from lightning_diff.data.distributions import (
    Checkerboard,
    Circle,
    Distribution,
    Gaussian,
    GaussianMixture,
    Rings,
    Sphere,
    SwissRoll,
    TwoMoons,
)
from lightning_diff.data.images import DigitsDataModule, ImageFolderDataModule, TorchvisionDataModule
from lightning_diff.data.synthetic import SyntheticDataModule

__all__ = [
    "ArrayDataModule",
    "Checkerboard",
    "Circle",
    "DiffusionDataModule",
    "DigitsDataModule",
    "Distribution",
    "Gaussian",
    "GaussianMixture",
    "ImageFolderDataModule",
    "Rings",
    "Sphere",
    "SwissRoll",
    "SyntheticDataModule",
    "TorchvisionDataModule",
    "TwoMoons",
    "load_array",
    "per_device_batch_size",
]
