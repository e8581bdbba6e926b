"""A user's own data from a ``.npy`` file: vectors ``(N, D)`` or images ``(N, C, H, W)``.

The file is validated up front and every problem is a one-line :class:`DataError` that names the
file and the fix, because a NaN or a wrongly scaled image would otherwise surface much later as a
diverging loss or washed-out samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_diff.data.datamodule import DiffusionDataModule
from lightning_diff.errors import DataError

#: Slack allowed above 1 / below -1 for float images, for values rounded on the way to the file.
RANGE_TOLERANCE = 1e-3


def load_array(path: str) -> Tensor:
    """Load and validate a ``.npy`` file as float32 data (images scaled to ``[-1, 1]``).

    Rules: a 2-D array is a set of vectors, any real dtype, used as is. A 4-D array is a set of
    images ``(N, C, H, W)``: uint8 in 0..255 (mapped to ``[-1, 1]``) or floats already in
    ``[-1, 1]`` (clipped after the tolerance check). There must be at least 2 samples and no NaN or
    infinite values. Pickled object arrays are refused (``allow_pickle=False``) since loading a
    pickle can run arbitrary code.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(
            f"array file {path} does not exist: set data.path to a .npy file saved with numpy.save"
        )
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"cannot load {path} as a .npy array ({reason}): save a numeric array with numpy.save"
        ) from err
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} holds several arrays (an .npz archive): save a single array with numpy.save")
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise DataError(f"{path} has dtype {array.dtype}: save real numbers (float, or uint8 for images)")
    if array.ndim not in (2, 4):
        raise DataError(
            f"{path} has shape {array.shape}: expected vectors (N, D) or images (N, C, H, W), "
            f"reshape it before saving"
        )
    if array.shape[0] < 2:
        raise DataError(f"{path} holds {array.shape[0]} sample(s): a dataset needs at least 2")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{path} contains {bad} NaN or infinite values: remove or fix those samples")

    if array.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    if array.shape[1] > 4 and array.shape[3] in (1, 3):
        raise DataError(
            f"{path} has shape {array.shape}, which looks channels-last (N, H, W, C): save "
            f"array.transpose(0, 3, 1, 2) instead"
        )
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32) / 127.5 - 1.0
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{path} holds {array.dtype} images: save uint8 (0..255) or floats scaled to [-1, 1]")
    low, high = float(array.min()), float(array.max())
    if low < -1.0 - RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise DataError(
            f"{path} holds float images in [{low:.4g}, {high:.4g}], outside [-1, 1]: rescale them "
            f"(e.g. x / 127.5 - 1 for 0..255 values) or save uint8"
        )
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return data.clamp(-1.0, 1.0)


class ArrayDataModule(DiffusionDataModule):
    """Data from a ``.npy`` file; see :func:`load_array` for the accepted layouts.

    Args:
        path: the ``.npy`` file; its stem becomes :attr:`name`.
        **kwargs: the :class:`DiffusionDataModule` arguments.
    """

    def __init__(self, path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = str(path)
        self.name = Path(self.path).stem

    def _load(self) -> Tensor:
        return load_array(self.path)
