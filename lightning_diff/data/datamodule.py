"""The DataModule every dataset in lightning_diff derives from.

A diffusion model only ever needs unlabeled samples ``x`` in data space, so every DataModule here
yields plain float32 tensors of shape ``(B, *data_shape)``; images are scaled to ``[-1, 1]``.
The base class owns everything that is the same for all datasets:

* the seeded split of the loaded samples into a held-out (validation) part and a training part,
  and the optional ``num_train`` subset of the training part used for memorization studies;
* the conversion of the *global* ``batch_size`` from the config into a per-device batch size;
* the DataLoaders, whose shuffle order comes from a seeded ``torch.Generator``;
* the random horizontal flip for images.

A subclass only implements :meth:`DiffusionDataModule._load`, which returns either one tensor of
all samples (in-memory data) or a ``Dataset`` whose items are single sample tensors (data read
from disk lazily), and sets :attr:`DiffusionDataModule.name`.

Over 400 lines: one class, whose split, subset, batch-size conversion, loaders and resumable
shuffle position share the same state; split across files they would hide the contract.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_diff.errors import ConfigError, DataError
from lightning_diff.seeding import seeded_generator


def per_device_batch_size(batch_size: int, world_size: int) -> int:
    """Split a global batch size over ``world_size`` devices; ConfigError if it does not divide.

    The config states the global batch size so that results do not change meaning when the number
    of GPUs changes. Rounding silently would change the effective batch size, so an uneven split
    is an error instead.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if batch_size % world_size != 0:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch size and must be divisible by the "
            f"{world_size} devices in use: set data.batch_size to a multiple of {world_size}"
        )
    return batch_size // world_size


def random_hflip(x: Tensor) -> Tensor:
    """Mirror an image ``(C, H, W)`` left to right with probability 1/2.

    The coin is drawn from torch's global generator, which Lightning's ``seed_everything`` seeds in
    the main process and the DataLoader reseeds per worker from the loader's generator, so flips
    are reproducible like the rest of training.
    """
    if torch.rand(()) < 0.5:
        return torch.flip(x, dims=(-1,))
    return x


class TensorSamples(Dataset):
    """A dataset over the first axis of one tensor; item ``i`` is the single sample ``data[i]``."""

    def __init__(self, data: Tensor):
        self.data = data

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]


class IndexedView(Dataset):
    """The items ``indices`` of a sample dataset, optionally randomly flipped (training images).

    With ``coded_flips`` the flip is decided by the caller instead of a coin: index ``i + len(self)``
    is item ``i`` mirrored (see :class:`~lightning_diff.data.sampler.ResumableSampler`).
    """

    def __init__(self, pool: Dataset, indices: Tensor, flip: bool = False, coded_flips: bool = False):
        self.pool = pool
        self.indices = indices
        self.flip = flip
        self.coded_flips = coded_flips

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, index: int) -> Tensor:
        if self.coded_flips:
            n = len(self)
            x = self.pool[int(self.indices[index % n])]
            return torch.flip(x, dims=(-1,)) if index >= n else x
        x = self.pool[int(self.indices[index])]
        return random_hflip(x) if self.flip else x


class DiffusionDataModule(L.LightningDataModule):
    """Base DataModule: seeded held-out split, ``num_train`` subset, global batch size, loaders.

    Args:
        batch_size: GLOBAL training batch size; each of the ``trainer.world_size`` devices gets
            ``batch_size // world_size`` samples per step (computed in :meth:`setup`).
        num_train: if given, train on a seeded random subset of this many training samples. Subsets
            are nested: the subset of size 100 is contained in the subset of size 200 for the
            same seed, so memorization curves over ``num_train`` compare like with like.
        val_fraction: fraction of the loaded samples held out for validation. The held-out part is
            taken *before* the ``num_train`` subset, so it does not change with ``num_train``.
        seed: governs the generation of synthetic data, the held-out split, the subset and the
            shuffle order.
        num_workers: DataLoader worker processes (0: batches are built in the training process).
        pin_memory: page-locked host batches for faster copies to a GPU; None (the default) turns it
            on exactly when CUDA is available.
        persistent_workers: keep the worker processes alive between epochs (and between training
            and validation); None (the default) turns it on whenever ``num_workers > 0``.
        flip: random horizontal flips of training images (an error for vector data).
        eval_batch_size: global batch size of the validation loader; defaults to ``batch_size``.
            It only bounds memory, so it is split over devices rounding up rather than erroring.

    The constructor arguments are deliberately not stored with ``save_hyperparameters``: Lightning
    merges DataModule and LightningModule hyperparameters when logging and refuses keys that
    appear in both with different values (``seed``, ``batch_size``), and a synthetic
    ``distribution`` object is not something a checkpoint should pickle.
    """

    #: Short dataset name used in run names and reports (e.g. ``"digits"``, ``"moons"``).
    name: str = "data"

    def __init__(
        self,
        batch_size: int = 128,
        num_train: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        flip: bool = False,
        eval_batch_size: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {batch_size}")
        if num_train is not None and int(num_train) < 1:
            raise ConfigError(f"data.num_train must be a positive integer or null, got {num_train}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if int(num_workers) < 0:
            raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers}")
        if eval_batch_size is not None and int(eval_batch_size) < 1:
            raise ConfigError(f"data.eval_batch_size must be at least 1 or null, got {eval_batch_size}")
        self.batch_size = int(batch_size)
        self.num_train = None if num_train is None else int(num_train)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.flip = bool(flip)
        self.eval_batch_size = self.batch_size if eval_batch_size is None else int(eval_batch_size)
        self.pin_memory = None if pin_memory is None else bool(pin_memory)
        self.persistent_workers = None if persistent_workers is None else bool(persistent_workers)

        # Filled by _build(); see there.
        self._pool: Dataset | None = None
        self._pool_tensor: Tensor | None = None
        self._data_shape: tuple[int, ...] | None = None
        self._train_idx: Tensor | None = None
        self._val_idx: Tensor | None = None
        self._train_cache: Tensor | None = None
        self._val_cache: Tensor | None = None
        # Per-device batch sizes; setup() recomputes them from the trainer's world size.
        self.device_batch_size = self.batch_size
        self.device_eval_batch_size = self.eval_batch_size
        # Resumable training order: the sampler of the current loader, the batches of its epoch
        # handed to training so far, and a position restored from a checkpoint (load_state_dict).
        self._train_sampler = None
        self._seen_epoch, self._seen_batches = -1, 0
        self._resume_position: tuple[int, int] | None = None

    # ----------------------------------------------------------------------------------------
    # What subclasses provide
    # ----------------------------------------------------------------------------------------
    def _load(self) -> Tensor | Dataset:
        """Return all samples before the split: one float32 tensor ``(N, *shape)`` or a Dataset.

        Items of a returned Dataset must be single float32 tensors in data space.
        """
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor | None:
        """Exact log density of ``x`` under the data distribution, or None where it is unknown."""
        return None

    def train_labels(self) -> Tensor | None:
        """Class labels of :meth:`train_tensor`'s rows where the dataset has them, else None."""
        return None

    # ----------------------------------------------------------------------------------------
    # Building and splitting
    # ----------------------------------------------------------------------------------------
    def _build(self) -> None:
        """Load the data and split it, once. Every public accessor calls this, so it is idempotent.

        Loading does not depend on the trainer, which is why it is separate from :meth:`setup`:
        ``data_shape`` or ``train_tensor()`` can be read before any trainer exists.
        """
        if self._pool is not None:
            return
        loaded = self._load()
        if isinstance(loaded, Tensor):
            self._pool_tensor = loaded.to(torch.float32).contiguous()
            pool: Dataset = TensorSamples(self._pool_tensor)
        else:
            pool = loaded
        total = len(pool)
        if total == 0:
            raise DataError(f"{self.name} holds no samples: check the data source in the data config")
        shape = tuple(self._pool_tensor.shape[1:]) if self._pool_tensor is not None else tuple(pool[0].shape)

        n_val = int(round(self.val_fraction * total))
        if total - n_val < 1:
            raise ConfigError(
                f"{self.name} has {total} samples and data.val_fraction={self.val_fraction} leaves none "
                f"for training: lower data.val_fraction"
            )
        order = torch.randperm(total, generator=seeded_generator(self.seed, "split"))
        val_idx, rest = order[:n_val], order[n_val:]
        if self.num_train is not None:
            if self.num_train > rest.numel():
                raise ConfigError(
                    f"data.num_train={self.num_train} exceeds the {rest.numel()} training samples of "
                    f"{self.name} left after holding out data.val_fraction={self.val_fraction} of "
                    f"{total}: lower data.num_train or data.val_fraction"
                )
            # ``rest`` is already a seeded random order, so its prefixes are nested random subsets.
            rest = rest[: self.num_train]
        if self.flip and len(shape) != 3:
            raise ConfigError(
                f"data.flip=true mirrors images, but {self.name} has per-sample shape {shape}: "
                f"set data.flip=false"
            )
        # Sorted indices read files in storage order; the loader shuffles anyway.
        self._train_idx = torch.sort(rest).values
        self._val_idx = torch.sort(val_idx).values
        self._data_shape = shape
        self._pool = pool

    def prepare_data(self) -> None:
        """Nothing to download by default; subclasses that download override this."""

    def setup(self, stage: str | None = None) -> None:
        """Build the data (once) and compute the per-device batch sizes from the trainer.

        Safe to call repeatedly. Without a trainer (``dm.setup("fit")`` from a script) the world
        size is 1.
        """
        self._build()
        trainer = getattr(self, "trainer", None)
        world_size = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        self.device_batch_size = per_device_batch_size(self.batch_size, world_size)
        self.device_eval_batch_size = max(1, math.ceil(self.eval_batch_size / world_size))

    # ----------------------------------------------------------------------------------------
    # Public accessors
    # ----------------------------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(2,)`` for points or ``(1, 8, 8)`` for digits."""
        self._build()
        assert self._data_shape is not None
        return self._data_shape

    @property
    def is_image(self) -> bool:
        """True for image data ``(C, H, W)``; False for vectors."""
        return len(self.data_shape) == 3

    @property
    def num_train_samples(self) -> int:
        """Number of training samples (after the ``num_train`` subset)."""
        self._build()
        return int(self._train_idx.numel())

    @property
    def num_val_samples(self) -> int:
        """Number of held-out samples."""
        self._build()
        return int(self._val_idx.numel())

    @property
    def train_indices(self) -> Tensor:
        """Indices of the training samples into the loaded data (sorted)."""
        self._build()
        return self._train_idx

    @property
    def val_indices(self) -> Tensor:
        """Indices of the held-out samples into the loaded data (sorted)."""
        self._build()
        return self._val_idx

    def train_dataset(self) -> Dataset:
        """The training samples as a Dataset of single tensors (flipped at random when ``flip``)."""
        self._build()
        return IndexedView(self._pool, self._train_idx, flip=self.flip)

    def val_dataset(self) -> Dataset:
        """The held-out samples as a Dataset of single tensors (never flipped)."""
        self._build()
        return IndexedView(self._pool, self._val_idx, flip=False)

    def _gather(self, indices: Tensor) -> Tensor:
        if self._pool_tensor is not None:
            return self._pool_tensor[indices]
        if indices.numel() == 0:
            return torch.empty((0, *self._data_shape), dtype=torch.float32)
        return torch.stack([self._pool[int(i)] for i in indices]).to(torch.float32)

    def train_tensor(self) -> Tensor:
        """All training samples (after the subset, never flipped) as one float32 ``(N, *data_shape)``."""
        self._build()
        if self._train_cache is None:
            self._train_cache = self._gather(self._train_idx)
        return self._train_cache

    def val_tensor(self) -> Tensor:
        """All held-out samples as one float32 tensor ``(N_val, *data_shape)`` (possibly empty)."""
        self._build()
        if self._val_cache is None:
            self._val_cache = self._gather(self._val_idx)
        return self._val_cache

    # ----------------------------------------------------------------------------------------
    # DataLoaders
    # ----------------------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict[str, Any]:
        """DataLoader options shared by the training and validation loaders, with the auto defaults
        resolved (persistent workers need workers, so they are off with ``num_workers=0``)."""
        persistent = self.num_workers > 0 if self.persistent_workers is None else self.persistent_workers
        pin = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        return {
            "num_workers": self.num_workers,
            "persistent_workers": persistent and self.num_workers > 0,
            "pin_memory": pin,
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of training samples, a float32 tensor ``(B, *data_shape)`` each.

        The last incomplete batch is dropped so every step sees the configured batch size, unless
        the training set is smaller than one global batch (tiny ``num_train``), where dropping it
        would leave nothing. The order (and the flips) come from a
        :class:`~lightning_diff.data.sampler.ResumableSampler`: a function of ``(seed, epoch)`` only,
        one global permutation sharded over the ranks, so one and several processes see the same
        global batches, and a resumed run skips the batches of the epoch it had already trained on.
        """
        from lightning_diff.data.sampler import ResumableSampler

        self._build()
        dataset = IndexedView(self._pool, self._train_idx, flip=self.flip, coded_flips=True)
        trainer = getattr(self, "trainer", None)
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        sampler = ResumableSampler(
            len(dataset),
            self.device_batch_size,
            num_replicas=world,
            rank=rank,
            seed=self.seed,
            drop_last=len(dataset) >= self.batch_size,
            flip_coins=self.flip,
        )
        if self._resume_position is not None:
            epoch, done = self._resume_position
            if done >= sampler.num_batches():  # saved at the end of an epoch: start the next one
                epoch, done = epoch + 1, 0
            sampler.skip_batches(epoch, done)
            self._resume_position = None
        self._train_sampler = sampler
        return DataLoader(
            dataset,
            batch_size=self.device_batch_size,
            sampler=sampler,
            drop_last=False,  # the sampler hands out whole batches already
            generator=seeded_generator(self.seed, "loader"),  # never draw from the global generator
            **self._loader_kwargs(),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Count the training batches of the current epoch as they are consumed (not as the loader
        # prefetches them), so a checkpoint written at the end of a step knows where to resume.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_sampler is not None:
            epoch = self._train_sampler.epoch
            if epoch != self._seen_epoch:
                self._seen_epoch, self._seen_batches = epoch, 0
            self._seen_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position in the training order: epoch and batches of it consumed (saved in checkpoints)."""
        if self._seen_epoch < 0:
            return {}
        return {"epoch": self._seen_epoch, "batches": self._seen_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "epoch" in state_dict:
            self._seen_epoch, self._seen_batches = int(state_dict["epoch"]), int(state_dict["batches"])
            self._resume_position = (self._seen_epoch, self._seen_batches)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out samples in a fixed order; an empty list (no validation) when nothing is held out."""
        dataset = self.val_dataset()
        if len(dataset) == 0:
            return []
        return DataLoader(
            dataset,
            batch_size=self.device_eval_batch_size,
            shuffle=False,
            drop_last=False,
            generator=seeded_generator(self.seed, "loader"),
            **self._loader_kwargs(),
        )

    def __repr__(self) -> str:
        shape = self._data_shape if self._data_shape is not None else "not loaded"
        return f"{type(self).__name__}(name={self.name!r}, data_shape={shape}, batch_size={self.batch_size})"
