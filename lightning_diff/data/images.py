"""Image DataModules: scikit-learn's 8x8 digits, torchvision's MNIST-style sets, and image folders.

All of them yield float32 images ``(C, H, W)`` scaled to ``[-1, 1]``, the range diffusion models
assume for images (the forward process starts from data of roughly unit scale and the sampler
clips to this range).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lightning_diff.data.datamodule import DiffusionDataModule
from lightning_diff.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def uint8_to_signed(image: Tensor) -> Tensor:
    """Map uint8 pixel values 0..255 to float32 in ``[-1, 1]``."""
    return image.to(torch.float32) / 127.5 - 1.0


def pil_to_signed(image: Image.Image) -> Tensor:
    """A PIL image (mode ``L`` or ``RGB``) as a float32 ``(C, H, W)`` tensor in ``[-1, 1]``."""
    array = np.array(image, dtype=np.uint8)  # a writable copy, which torch.from_numpy expects
    # Grayscale arrays are (H, W); colour arrays are channels-last (H, W, C).
    array = array[np.newaxis] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
    return uint8_to_signed(torch.from_numpy(array))


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize so the shorter side is ``resolution`` (bicubic), then crop the central square.

    Scaling the shorter side keeps the aspect ratio, so non-square images are cropped rather than
    squashed.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != (width, height):
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class DigitsDataModule(DiffusionDataModule):
    """scikit-learn's bundled handwritten digits: 1797 grayscale 8x8 images, shape ``(1, 8, 8)``.

    The data ships inside scikit-learn, so it works offline and loads in milliseconds, which makes
    it the image dataset for tests and quick experiments. Pixel values 0..16 are mapped to
    ``[-1, 1]`` as ``x / 16 * 2 - 1``. The labels are kept for class-conditional experiments and
    classifier-based metrics (:meth:`train_labels`, :meth:`val_labels`).

    Args:
        **kwargs: the :class:`DiffusionDataModule` arguments.
    """

    name = "digits"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._labels: Tensor | None = None

    def _load(self) -> Tensor:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).reshape(-1, 1, 8, 8)
        self._labels = torch.as_tensor(digits.target, dtype=torch.int64)
        return images / 16.0 * 2.0 - 1.0

    def train_labels(self) -> Tensor:
        """Digit labels 0..9 of :meth:`train_tensor`'s rows, int64 ``(N,)``."""
        self._build()
        return self._labels[self.train_indices]

    def val_labels(self) -> Tensor:
        """Digit labels 0..9 of :meth:`val_tensor`'s rows, int64 ``(N_val,)``."""
        self._build()
        return self._labels[self.val_indices]


class _TorchvisionImages(Dataset):
    """Items of a torchvision classification dataset as images in ``[-1, 1]``, labels dropped."""

    def __init__(self, dataset: Dataset, resolution: int | None):
        self.dataset = dataset
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tensor:
        image, _ = self.dataset[index]
        if self.resolution is not None and image.size != (self.resolution, self.resolution):
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        return pil_to_signed(image)


class TorchvisionDataModule(DiffusionDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 from torchvision; the official training split is the data.

    Images are decoded lazily per item (the held-out split and the subset are index lists), so
    nothing is converted up front. Nothing is downloaded unless ``download=True``; a missing dataset
    is a :class:`DataError` explaining how to get it.

    Args:
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        root: folder holding (or receiving) the torchvision files.
        download: let torchvision download the files into ``root`` (needs internet).
        resolution: resize the square images to this size (e.g. MNIST 28 -> 32, which suits U-Nets
            that halve the resolution several times); None keeps the native size.
        **kwargs: the :class:`DiffusionDataModule` arguments.
    """

    DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        download: bool = False,
        resolution: int | None = None,
        **kwargs: Any,
    ):
        key = str(dataset).lower()
        if key not in self.DATASETS:
            raise ConfigError(
                f"data.dataset={dataset!r} is not supported: use one of {sorted(self.DATASETS)}"
            )
        if resolution is not None and int(resolution) < 1:
            raise ConfigError(f"data.resolution must be a positive integer or null, got {resolution}")
        super().__init__(**kwargs)
        self.dataset = key
        self.root = str(root)
        self.download = bool(download)
        self.resolution = None if resolution is None else int(resolution)
        self.name = key
        self._torchvision_dataset: Dataset | None = None

    def _open(self, download: bool) -> Dataset:
        import torchvision.datasets

        cls_name = self.DATASETS[self.dataset]
        cls = getattr(torchvision.datasets, cls_name)
        try:
            return cls(root=self.root, train=True, download=download)
        except (RuntimeError, OSError) as err:
            where = self.root.rstrip("/") + "/"
            if download:
                raise DataError(
                    f"downloading {cls_name} into {where} failed ({err}): check the internet connection "
                    f"or put the files there and set data.download=false"
                ) from err
            raise DataError(
                f"{cls_name} not found under {where}: rerun with data.download=true (needs internet) or "
                f"point data.root at a folder that holds it"
            ) from err

    def prepare_data(self) -> None:
        """Download on one process only (Lightning calls this on rank 0) when ``download`` is set."""
        if self.download:
            self._open(download=True)

    def _load(self) -> Dataset:
        self._torchvision_dataset = self._open(download=self.download)
        return _TorchvisionImages(self._torchvision_dataset, self.resolution)

    def train_labels(self) -> Tensor:
        """Class labels of :meth:`train_tensor`'s rows, int64 ``(N,)``."""
        self._build()
        targets = torch.as_tensor(self._torchvision_dataset.targets, dtype=torch.int64)
        return targets[self.train_indices]


class _ImageFiles(Dataset):
    """Image files decoded on access, converted to ``channels``, resized and center-cropped."""

    def __init__(self, files: list[Path], resolution: int, channels: int):
        self.files = files
        self.resolution = resolution
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert(self.mode)
        except OSError as err:
            raise DataError(f"cannot read image {path} ({err}): remove or replace the file") from err
        return pil_to_signed(resize_center_crop(image, self.resolution))


class ImageFolderDataModule(DiffusionDataModule):
    """Every image file under a folder (recursively), as a dataset of unlabeled images.

    Files with suffix png, jpg, jpeg, bmp or webp (any case) are used, in sorted path order so the
    seeded split is the same on every machine. Images are converted to grayscale or RGB per
    ``channels``, resized so the shorter side is ``resolution`` and center-cropped to a square.

    Args:
        path: the folder.
        resolution: side length of the square images.
        channels: 1 (grayscale) or 3 (RGB).
        **kwargs: the :class:`DiffusionDataModule` arguments.
    """

    def __init__(self, path: str, resolution: int = 32, channels: int = 3, **kwargs: Any):
        if int(channels) not in (1, 3):
            raise ConfigError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if int(resolution) < 1:
            raise ConfigError(f"data.resolution must be a positive integer, got {resolution}")
        super().__init__(**kwargs)
        self.path = str(path)
        self.resolution = int(resolution)
        self.channels = int(channels)
        self.name = Path(self.path).name or "images"

    def _load(self) -> Dataset:
        folder = Path(self.path)
        if not folder.is_dir():
            raise DataError(f"image folder {self.path} does not exist: set data.path to a folder of images")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.path}: set data.path to a folder "
                f"that holds images"
            )
        return _ImageFiles(files, self.resolution, self.channels)
