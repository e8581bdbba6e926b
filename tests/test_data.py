"""Tests of lightning_diff.data: shapes, ranges, seeding, splits, batch sizes, densities, file errors.

Everything runs offline: images come from scikit-learn's bundled digits, from PNGs written here, or
from tiny MNIST, Fashion-MNIST and CIFAR-10 files written here in torchvision's layout.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_torchvision_files
from PIL import Image
from scipy.stats import multivariate_normal
from sklearn.datasets import load_digits

from lightning_diff.data import (
    ArrayDataModule,
    Checkerboard,
    Circle,
    DigitsDataModule,
    Gaussian,
    GaussianMixture,
    ImageFolderDataModule,
    Rings,
    Sphere,
    SwissRoll,
    SyntheticDataModule,
    TorchvisionDataModule,
    TwoMoons,
    per_device_batch_size,
)
from lightning_diff.errors import ConfigError, DataError


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _moons(**kwargs) -> SyntheticDataModule:
    kwargs.setdefault("num_samples", 1000)
    return SyntheticDataModule(TwoMoons(noise=0.1), **kwargs)


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes and ranges
# ------------------------------------------------------------------------------------------------
ALL_DISTRIBUTIONS = [
    Gaussian(dim=3),
    GaussianMixture(),
    TwoMoons(),
    SwissRoll(),
    Checkerboard(),
    Rings(),
    Circle(dim=5),
    Sphere(dim=4),
]


@pytest.mark.parametrize("dist", ALL_DISTRIBUTIONS, ids=lambda d: type(d).__name__)
def test_distribution_samples_are_float32_and_deterministic(dist):
    a = dist.sample(500, _generator(1))
    b = dist.sample(500, _generator(1))
    c = dist.sample(500, _generator(2))
    assert a.shape == (500, dist.dim) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), "same generator state must give the same samples"
    assert not torch.equal(a, c), "a different generator must give different samples"


@pytest.mark.parametrize("dist", [TwoMoons(), SwissRoll(), Checkerboard(), Rings()], ids=lambda d: d.name)
def test_2d_toy_distributions_have_roughly_unit_scale(dist):
    x = dist.sample(20000, _generator(0))
    std = x.std(dim=0)
    assert torch.all((std > 0.7) & (std < 1.3)), f"per-axis std {std.tolist()} is not roughly 1"
    assert x.mean(dim=0).abs().max() < 0.5


def test_synthetic_datamodule_batches_and_split():
    dm = SyntheticDataModule(Gaussian(dim=3), num_samples=1000, batch_size=64, val_fraction=0.2)
    dm.setup("fit")
    assert dm.data_shape == (3,) and not dm.is_image and dm.name == "gaussian"
    assert dm.train_tensor().shape == (800, 3) and dm.val_tensor().shape == (200, 3)
    assert dm.train_tensor().dtype == torch.float32
    batches = list(dm.train_dataloader())
    assert len(batches) == 800 // 64, "drop_last leaves only full batches"
    assert all(
        isinstance(b, torch.Tensor) and b.shape == (64, 3) and b.dtype == torch.float32 for b in batches
    )
    # Every training batch row is a row of the training set, and one epoch covers distinct rows.
    seen = torch.cat(batches)
    assert torch.unique(seen, dim=0).shape[0] == seen.shape[0]
    assert torch.isin(seen[:, 0], dm.train_tensor()[:, 0]).all()
    val = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(val, dm.val_tensor()), "the validation loader is unshuffled and complete"


def test_digits_shape_range_and_values_match_sklearn():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    assert dm.name == "digits" and dm.data_shape == (1, 8, 8) and dm.is_image
    x = dm.train_tensor()
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert dm.num_train_samples + dm.num_val_samples == 1797
    assert dm.num_val_samples == round(0.1 * 1797)
    assert x.min() == -1.0 and x.max() == 1.0, "0 and 16 map exactly to -1 and 1"
    raw = load_digits()
    expected = torch.as_tensor(raw.images[dm.train_indices.numpy()], dtype=torch.float32) / 8.0 - 1.0
    assert torch.allclose(x[:, 0], expected)
    labels = dm.train_labels()
    assert labels.shape == (x.shape[0],) and labels.dtype == torch.int64
    assert torch.equal(labels, torch.as_tensor(raw.target[dm.train_indices.numpy()]))
    assert set(labels.tolist()) == set(range(10))
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (32, 1, 8, 8) and batch.min() >= -1 and batch.max() <= 1


def test_setup_is_idempotent():
    dm = DigitsDataModule()
    dm.setup("fit")
    first = dm.train_tensor()
    dm.setup("fit")
    dm.setup("validate")
    assert dm.train_tensor() is first, "setup must not reload or resplit the data"


def test_data_shape_is_available_without_explicit_setup():
    assert _moons().data_shape == (2,)


# ------------------------------------------------------------------------------------------------
# Seeding, held-out split and num_train subset
# ------------------------------------------------------------------------------------------------
def test_same_seed_same_data_and_order_different_seed_different():
    a, b, c = _moons(seed=3), _moons(seed=3), _moons(seed=4)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_tensor(), b.train_tensor())
    assert torch.equal(next(iter(a.train_dataloader())), next(iter(b.train_dataloader())))
    assert not torch.equal(a.train_tensor(), c.train_tensor())


def test_shuffle_order_is_seeded_but_not_sorted():
    dm = DigitsDataModule(batch_size=64, seed=5)
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(first, again), "a fresh loader replays the same seeded order"
    assert not torch.equal(first, dm.train_tensor()[:64]), "the loader shuffles"


def test_split_depends_on_seed_for_fixed_data():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    assert not torch.equal(a.val_indices, b.val_indices)
    assert torch.equal(a.val_indices, DigitsDataModule(seed=0).val_indices)


def test_num_train_subset_is_sized_disjoint_nested_and_keeps_heldout_fixed():
    full = DigitsDataModule(seed=2)
    small = DigitsDataModule(seed=2, num_train=100)
    larger = DigitsDataModule(seed=2, num_train=400)
    assert small.num_train_samples == 100 and small.train_tensor().shape == (100, 1, 8, 8)
    train, val = set(small.train_indices.tolist()), set(small.val_indices.tolist())
    assert not train & val, "training subset and held-out split must be disjoint"
    assert torch.equal(small.val_indices, full.val_indices), "held-out split is taken before the subset"
    assert train <= set(larger.train_indices.tolist()), "subsets of one seed are nested"
    assert train <= set(full.train_indices.tolist())


def test_num_train_larger_than_available_is_config_error():
    dm = _moons(num_samples=100, num_train=95, val_fraction=0.1)
    with pytest.raises(ConfigError, match="num_train=95"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"val_fraction": 1.0}, {"val_fraction": -0.1}, {"num_train": 0}, {"num_workers": -1}],
)
def test_bad_base_arguments_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        _moons(**kwargs)


def test_no_heldout_split_gives_empty_val_loader():
    dm = _moons(val_fraction=0.0)
    dm.setup("fit")
    assert dm.num_val_samples == 0 and dm.val_tensor().shape == (0, 2)
    assert len(dm.val_dataloader()) == 0


# ------------------------------------------------------------------------------------------------
# Global batch size and drop_last
# ------------------------------------------------------------------------------------------------
def test_global_batch_is_split_over_devices():
    dm = _moons(batch_size=128, eval_batch_size=100)
    dm.trainer = SimpleNamespace(world_size=2)
    dm.setup("fit")
    assert dm.device_batch_size == 64
    assert next(iter(dm.train_dataloader())).shape == (64, 2)
    assert dm.device_eval_batch_size == 50
    assert per_device_batch_size(256, 4) == 64


def test_indivisible_global_batch_is_config_error():
    dm = _moons(batch_size=128)
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ConfigError, match="divisible"):
        dm.setup("fit")


def test_drop_last_only_when_a_full_batch_exists():
    tiny = _moons(batch_size=128, num_train=10)
    tiny.setup("fit")
    assert [b.shape[0] for b in tiny.train_dataloader()] == [10], (
        "a training set smaller than a batch is kept"
    )
    some = _moons(batch_size=128, num_train=300)
    some.setup("fit")
    assert [b.shape[0] for b in some.train_dataloader()] == [128, 128]


def test_lightning_trainer_runs_a_step_on_the_datamodule():
    import lightning as L

    class Mean(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.zeros(2))
            self.shapes = []

        def training_step(self, batch, batch_idx):
            self.shapes.append(tuple(batch.shape))
            return (batch - self.mu).square().mean()

        def validation_step(self, batch, batch_idx):
            self.shapes.append(tuple(batch.shape))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Mean()
    trainer = L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=_moons(batch_size=16))
    assert model.shapes == [(16, 2), (16, 2)], "one training and one validation batch of the per-device size"


# ------------------------------------------------------------------------------------------------
# Flips
# ------------------------------------------------------------------------------------------------
def test_flip_mirrors_training_images_only():
    torch.manual_seed(0)
    dm = DigitsDataModule(flip=True, num_train=200)
    dataset = dm.train_dataset()
    original = dm.train_tensor()
    flipped = 0
    for i in range(len(dataset)):
        item = dataset[i]
        if torch.equal(item, original[i]):
            continue
        assert torch.equal(item, torch.flip(original[i], dims=(-1,))), "a changed image is exactly mirrored"
        flipped += 1
    assert 60 < flipped < 140, f"about half of 200 images should be mirrored, got {flipped}"
    val = dm.val_dataset()
    assert all(torch.equal(val[i], dm.val_tensor()[i]) for i in range(len(val))), "no flips in validation"
    unflipped = DigitsDataModule(num_train=200).train_dataset()
    assert all(torch.equal(unflipped[i], original[i]) for i in range(len(unflipped)))


def test_flip_on_vectors_is_config_error():
    with pytest.raises(ConfigError, match="flip"):
        _moons(flip=True).setup("fit")


# ------------------------------------------------------------------------------------------------
# Densities against scipy and Monte Carlo
# ------------------------------------------------------------------------------------------------
def test_gaussian_log_prob_matches_scipy():
    for dist in (Gaussian(dim=4, seed=3), Gaussian(mean=[1.0, -2.0], cov=[[2.0, 0.6], [0.6, 0.5]])):
        x = dist.sample(50, _generator(0)).double() + 0.5
        oracle = multivariate_normal(dist.mean.numpy(), dist.cov.numpy()).logpdf(x.numpy())
        np.testing.assert_allclose(dist.log_prob(x).numpy(), oracle, rtol=1e-10, atol=1e-10)


def test_gaussian_monte_carlo_mean_and_cov():
    # With n = 200k the standard error of each mean entry is sqrt(var / n) < 0.005 and of each
    # covariance entry below 0.01 here; tolerances of 0.02 / 0.04 are about 4 standard errors.
    dist = Gaussian(mean=[1.0, -2.0, 0.5], cov=[[2.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 1.0]])
    x = dist.sample(200_000, _generator(0)).double()
    assert torch.allclose(x.mean(dim=0), dist.mean, atol=0.02)
    assert torch.allclose(torch.cov(x.T), dist.cov, atol=0.04)


def test_random_gaussian_is_seeded_and_well_conditioned():
    a, b, c = Gaussian(dim=5, seed=1), Gaussian(dim=5, seed=1), Gaussian(dim=5, seed=2)
    assert torch.equal(a.cov, b.cov) and torch.equal(a.mean, b.mean)
    assert not torch.equal(a.cov, c.cov)
    assert a.mean.dtype == torch.float64 and a.cov.shape == (5, 5)
    assert torch.linalg.eigvalsh(a.cov).min() >= 0.1 - 1e-9, "A A^T / d + 0.1 I has eigenvalues >= 0.1"


def test_gmm_log_prob_matches_scipy_mixture_and_moments():
    means = [[0.0, 0.0], [3.0, 1.0], [-2.0, 2.0]]
    covs = [[[1.0, 0.3], [0.3, 0.5]], [[0.3, 0.0], [0.0, 0.3]], [[0.8, -0.2], [-0.2, 0.4]]]
    weights = [0.5, 0.3, 0.2]
    dist = GaussianMixture(means=means, covs=covs, weights=weights)
    x = torch.randn(100, 2, generator=_generator(4), dtype=torch.float64) * 2.0
    oracle = np.log(
        sum(
            w * multivariate_normal(m, c).pdf(x.numpy()) for m, c, w in zip(means, covs, weights, strict=True)
        )
    )
    np.testing.assert_allclose(dist.log_prob(x).numpy(), oracle, rtol=1e-9, atol=1e-9)

    # Mixture moments: mean = sum w mu, cov = sum w (Sigma + mu mu^T) - mean mean^T. Tolerances as
    # in the Gaussian test (n = 200k, entries of order 1-3, about 4 standard errors).
    m, c, w = torch.tensor(means).double(), torch.tensor(covs).double(), torch.tensor(weights).double()
    mean = (w.reshape(3, 1) * m).sum(dim=0)
    second = (w.reshape(3, 1, 1) * (c + torch.einsum("ki,kj->kij", m, m))).sum(dim=0)
    samples = dist.sample(200_000, _generator(0)).double()
    assert torch.allclose(samples.mean(dim=0), mean, atol=0.03)
    assert torch.allclose(torch.cov(samples.T), second - torch.outer(mean, mean), atol=0.06)


def test_default_gmm_is_a_ring_of_isotropic_components():
    dist = GaussianMixture()
    assert dist.means.shape == (8, 2)
    assert torch.allclose(dist.means.norm(dim=1), torch.full((8,), 4.0, dtype=torch.float64))
    assert torch.allclose(dist.covs, 0.25 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2))
    x = torch.randn(20, 2, dtype=torch.float64)
    oracle = np.log(
        sum(multivariate_normal(mu, 0.25 * np.eye(2)).pdf(x.numpy()) / 8 for mu in dist.means.numpy())
    )
    np.testing.assert_allclose(dist.log_prob(x).numpy(), oracle, rtol=1e-9)


def test_checkerboard_density_integrates_to_one_and_covers_samples():
    dist = Checkerboard()
    h = 0.01
    centers = torch.arange(-3.0 + h / 2, 3.0, h, dtype=torch.float64)
    grid = torch.cartesian_prod(centers, centers)
    mass = dist.log_prob(grid).exp().sum() * h * h
    assert abs(float(mass) - 1.0) < 1e-6
    samples = dist.sample(5000, _generator(0))
    assert torch.isfinite(dist.log_prob(samples)).all(), "every sample lies on a filled cell"
    assert torch.allclose(dist.log_prob(samples), torch.full((5000,), -math.log(8.0)))
    assert dist.log_prob(torch.tensor([[0.5, -0.5], [2.5, 0.0]])).isinf().all(), "empty cell and outside"


def test_log_prob_is_none_without_closed_form():
    gaussian = SyntheticDataModule(Gaussian(dim=2), num_samples=100)
    x = gaussian.train_tensor()[:5]
    assert gaussian.has_log_prob and gaussian.log_prob(x).shape == (5,)
    assert torch.allclose(gaussian.log_prob(x), gaussian.distribution.log_prob(x))
    assert not _moons().has_log_prob and _moons().log_prob(x) is None
    assert DigitsDataModule().log_prob(torch.zeros(2, 1, 8, 8)) is None


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Gaussian(mean=[0.0, 0.0], cov=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
        lambda: Gaussian(mean=[0.0, 0.0], cov=[[1.0, 2.0], [2.0, 1.0]]),
        lambda: Gaussian(cov=[[1.0, 0.5], [0.0, 1.0]]),
        lambda: GaussianMixture(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 1.0, 1.0]),
        lambda: GaussianMixture(means=[[0.0, 0.0]], weights=[-1.0]),
        lambda: GaussianMixture(stds=0.5, covs=[[[1.0, 0.0], [0.0, 1.0]]] * 8),
        lambda: TwoMoons(noise=-1.0),
        lambda: Circle(dim=1),
        lambda: Sphere(dim=2),
        lambda: Circle(radius=0.0),
    ],
)
def test_bad_distribution_parameters_are_config_errors(bad):
    with pytest.raises(ConfigError):
        bad()


# ------------------------------------------------------------------------------------------------
# Manifolds
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", [Circle(dim=6, radius=2.0, seed=1), Sphere(dim=5, radius=0.5, seed=1)])
def test_manifold_samples_lie_on_the_rotated_sphere(dist):
    k1 = dist.intrinsic_dim + 1
    rotation = dist.rotation
    assert torch.allclose(rotation.T @ rotation, torch.eye(dist.dim, dtype=torch.float64), atol=1e-12)
    x = dist.sample(2000, _generator(0)).double()
    local = x @ rotation  # undo x = rotation @ p row-wise
    assert torch.allclose(
        local[:, :k1].norm(dim=1), torch.full((2000,), dist.radius, dtype=torch.float64), atol=1e-5
    )
    assert local[:, k1:].abs().max() < 1e-5, "no mass outside the sphere's subspace"
    assert torch.allclose(x.norm(dim=1), torch.full((2000,), dist.radius, dtype=torch.float64), atol=1e-5)
    # The points span exactly intrinsic_dim + 1 ambient directions, and they are not axis aligned.
    singular = torch.linalg.svdvals(x)
    assert int((singular > 1e-3 * singular[0]).sum()) == k1
    assert x[:, k1:].abs().max() > 0.1, "the random rotation moves mass off the first coordinates"


def test_noisy_circle_leaves_the_manifold_by_about_the_noise():
    dist = Circle(dim=3, radius=1.0, noise=0.1)
    x = dist.sample(5000, _generator(0)).double() @ dist.rotation
    assert 0.08 < x[:, 2].std() < 0.12


# ------------------------------------------------------------------------------------------------
# torchvision: missing data and a tiny fake MNIST in torchvision's file layout
# ------------------------------------------------------------------------------------------------
def test_missing_torchvision_dataset_is_data_error_mentioning_download(tmp_path):
    dm = TorchvisionDataModule(dataset="mnist", root=str(tmp_path))
    with pytest.raises(DataError, match="download") as info:
        dm.setup("fit")
    assert "MNIST" in str(info.value) and str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_torchvision_dataset_is_config_error():
    with pytest.raises(ConfigError, match="mnist"):
        TorchvisionDataModule(dataset="imagenet")


def test_torchvision_datamodule_on_fake_mnist_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    labels = np.arange(20, dtype=np.uint8) % 10
    write_torchvision_files(tmp_path, "mnist", images, labels)

    dm = TorchvisionDataModule(dataset="mnist", root=str(tmp_path), val_fraction=0.2, batch_size=4)
    dm.setup("fit")
    assert dm.data_shape == (1, 28, 28) and dm.num_train_samples == 16 and dm.num_val_samples == 4
    x = dm.train_tensor()
    expected = torch.as_tensor(images[dm.train_indices.numpy()]).float().unsqueeze(1) / 127.5 - 1.0
    assert torch.allclose(x, expected, atol=1e-6)
    assert torch.equal(dm.train_labels(), torch.as_tensor(labels[dm.train_indices.numpy()]).long())
    assert next(iter(dm.train_dataloader())).shape == (4, 1, 28, 28)

    resized = TorchvisionDataModule(dataset="mnist", root=str(tmp_path), resolution=32, val_fraction=0.0)
    y = resized.train_tensor()
    assert resized.data_shape == (1, 32, 32) and y.dtype == torch.float32
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert torch.allclose(y[0], torch.full((1, 32, 32), -1.0)) and torch.allclose(y[1], torch.ones(1, 32, 32))


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_torchvision_datamodule_on_fake_fashion_mnist_and_cifar_files(dataset, tmp_path, monkeypatch):
    """The other two sets through torchvision's own readers: pixel values, channel order and labels."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file()
    )
    rng = np.random.default_rng(1)
    shape = (15, 28, 28) if dataset == "fashion_mnist" else (15, 32, 32, 3)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = np.arange(15, dtype=np.uint8) % 10
    write_torchvision_files(tmp_path, dataset, images, labels)
    dm = TorchvisionDataModule(dataset=dataset, root=str(tmp_path), val_fraction=0.2, batch_size=4)
    dm.setup("fit")
    pixels = torch.as_tensor(images[dm.train_indices.numpy()]).float()
    pixels = pixels.unsqueeze(1) if dataset == "fashion_mnist" else pixels.permute(0, 3, 1, 2)
    assert dm.data_shape == tuple(pixels.shape[1:]) and dm.num_train_samples == 12
    torch.testing.assert_close(dm.train_tensor(), pixels / 127.5 - 1.0, rtol=0, atol=1e-6)
    assert torch.equal(dm.train_labels(), torch.as_tensor(labels[dm.train_indices.numpy()]).long())


# ------------------------------------------------------------------------------------------------
# Image folders
# ------------------------------------------------------------------------------------------------
def test_image_folder_reads_resizes_and_crops(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red_wide.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "black.png")
    Image.new("RGB", (24, 48), (255, 255, 255)).save(tmp_path / "sub" / "white_tall.PNG")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "sub" / "blue.bmp")
    (tmp_path / "notes.txt").write_text("not an image")

    dm = ImageFolderDataModule(str(tmp_path), resolution=8, channels=3, val_fraction=0.0, batch_size=2)
    dm.setup("fit")
    assert dm.data_shape == (3, 8, 8) and dm.is_image and dm.num_train_samples == 4
    x = dm.train_tensor()
    assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0
    # Sorted path order: black.png, red_wide.png, sub/blue.bmp, sub/white_tall.PNG.
    colors = x.mean(dim=(2, 3))
    expected = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(colors, expected, atol=1e-5)
    assert next(iter(dm.train_dataloader())).shape == (2, 3, 8, 8)

    gray = ImageFolderDataModule(str(tmp_path), resolution=8, channels=1, val_fraction=0.0)
    assert gray.data_shape == (1, 8, 8)


def test_resize_keeps_aspect_and_crops_center(tmp_path):
    # A 2:1 white image with black edge strips: resized to 16x8, the crop keeps the central 8x8,
    # away from the strips (and from the bicubic kernel's reach into them).
    wide = Image.new("L", (32, 16), 255)
    wide.paste(0, (0, 0, 4, 16))
    wide.paste(0, (28, 0, 32, 16))
    wide.save(tmp_path / "a.png")
    x = ImageFolderDataModule(str(tmp_path), resolution=8, channels=1, val_fraction=0.0).train_tensor()
    assert x.shape == (1, 1, 8, 8)
    assert x.min() > 0.99, "the center crop of a 2:1 image drops the edges instead of squashing them"


def test_image_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope"):
        ImageFolderDataModule(str(missing)).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataModule(str(tmp_path / "empty")).setup("fit")
    with pytest.raises(ConfigError):
        ImageFolderDataModule(str(tmp_path), channels=2)


# ------------------------------------------------------------------------------------------------
# .npy arrays
# ------------------------------------------------------------------------------------------------
def test_array_vectors(tmp_path):
    data = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "points.npy", data)
    dm = ArrayDataModule(str(tmp_path / "points.npy"), val_fraction=0.2, batch_size=8)
    dm.setup("fit")
    assert dm.name == "points" and dm.data_shape == (3,) and not dm.is_image
    x = dm.train_tensor()
    assert x.dtype == torch.float32 and x.shape == (40, 3)
    assert torch.allclose(x, torch.as_tensor(data[dm.train_indices.numpy()], dtype=torch.float32))
    assert next(iter(dm.train_dataloader())).shape == (8, 3)


def test_array_uint8_images(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=(10, 3, 4, 4), dtype=np.uint8)
    data[0] = 0
    data[1] = 255
    np.save(tmp_path / "imgs.npy", data)
    dm = ArrayDataModule(str(tmp_path / "imgs.npy"), val_fraction=0.0)
    x = dm.train_tensor()
    assert dm.data_shape == (3, 4, 4) and dm.is_image and x.dtype == torch.float32
    assert torch.allclose(x, torch.as_tensor(data, dtype=torch.float32) / 127.5 - 1.0)
    assert x[0].eq(-1.0).all() and x[1].eq(1.0).all()


def test_array_float_images_within_tolerance_are_clipped(tmp_path):
    data = np.random.default_rng(0).uniform(-1, 1, size=(6, 1, 5, 5)).astype(np.float32)
    data[0, 0, 0, 0] = 1.0005  # rounding slack inside the 1e-3 tolerance
    np.save(tmp_path / "f.npy", data)
    x = ArrayDataModule(str(tmp_path / "f.npy"), val_fraction=0.0).train_tensor()
    assert x.shape == (6, 1, 5, 5) and x.max() == 1.0 and x.min() >= -1.0
    assert torch.allclose(x[1:], torch.as_tensor(data[1:]))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (np.zeros((5, 4, 4)), "shape"),
        (np.full((4, 1, 2, 2), 3.0), "outside"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
        (np.zeros((1, 2)), "at least 2"),
        (b"this is not a numpy file", "cannot load"),
        (np.zeros((3, 1, 2, 2), dtype=np.int32), "uint8"),
    ],
    ids=["missing", "3d", "out_of_range", "nan", "one_sample", "garbage", "int32_images"],
)
def test_array_errors_are_one_line_and_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    with pytest.raises(DataError, match=match) as info:
        ArrayDataModule(str(path)).setup("fit")
    message = str(info.value)
    assert str(path) in message and "\n" not in message
