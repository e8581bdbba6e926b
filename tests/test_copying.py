"""The data-copying test (Meehan et al. 2020) and the held-out comparisons at equal size, against
scipy, scikit-learn and brute-force computations, and on the cases they exist for: copies and noisy
copies are flagged, fresh data of the same distribution are not."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import scipy.stats
import torch
from sklearn.cluster import KMeans

from lightning_diff.metrics.copying import DataCopying, default_num_cells, mann_whitney_u, z_scored_u
from lightning_diff.metrics.heldout import HeldoutComparison, precision_recall, resampled_mmd


def gaussian_data(n: int, seed: int, dim: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 2.0, dim)
    return torch.randn(n, dim, generator=gen) * scales


@pytest.mark.parametrize("ties", [False, True])
def test_u_statistic_equals_scipy(ties):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(37, generator=gen), torch.randn(52, generator=gen) + 0.3
    if ties:
        x, y = x.mul(2).round(), y.mul(2).round()
    expected = scipy.stats.mannwhitneyu(x.numpy(), y.numpy()).statistic
    assert float(mann_whitney_u(x, y)) == pytest.approx(expected, abs=1e-9)


def test_z_score_equals_scipys_normal_approximation():
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, generator=gen) - 0.2, torch.randn(60, generator=gen)
    p = scipy.stats.mannwhitneyu(
        x.numpy(), y.numpy(), alternative="less", method="asymptotic", use_continuity=False
    ).pvalue
    assert z_scored_u(x, y) == pytest.approx(scipy.stats.norm.ppf(p), abs=1e-6)  # scipy works in float32 here


def brute_force_ct(train, heldout, samples, num_cells, min_cell_samples, seed) -> float:
    """The statistic from scikit-learn's k-means, scipy's distances and U test, written out."""
    km = KMeans(n_clusters=num_cells, n_init=4, random_state=seed).fit(train.double().numpy())
    cells = lambda x: scipy.spatial.distance.cdist(x, km.cluster_centers_).argmin(1)  # noqa: E731
    nn1 = lambda x: scipy.spatial.distance.cdist(x, train.double().numpy()).min(1)  # noqa: E731
    h, s = heldout.double().numpy(), samples.double().numpy()
    hc, sc, hd, sd = cells(h), cells(s), nn1(h), nn1(s)
    total, weight = 0.0, 0.0
    for c in range(num_cells):
        m, n = int((sc == c).sum()), int((hc == c).sum())
        if m < min_cell_samples or n == 0:
            continue
        u = scipy.stats.mannwhitneyu(sd[sc == c], hd[hc == c]).statistic
        z = (u - m * n / 2) / np.sqrt(m * n * (m + n + 1) / 12)
        total, weight = total + n * z, weight + n
    return total / weight


def test_ct_equals_a_brute_force_computation():
    train, heldout = gaussian_data(600, 0), gaussian_data(300, 1)
    samples = torch.cat([train[:100] + 0.05 * gaussian_data(100, 3), gaussian_data(200, 2)])
    metric = DataCopying(train, heldout, num_cells=5, min_cell_samples=15, seed=4)
    for chunk in samples.split(70):
        metric.update(chunk)
    values = metric.compute()
    expected = brute_force_ct(train, heldout, samples, 5, 15, 4)
    assert float(values["data_copying_ct"]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert default_num_cells(300, 600) == 6 and default_num_cells(30, 600) == 1


def test_copies_are_flagged_and_fresh_data_are_not_on_vectors():
    train, heldout = gaussian_data(1000, 0), gaussian_data(500, 1)
    metric = DataCopying(train, heldout, seed=0)
    index = torch.randint(len(train), (500,), generator=torch.Generator().manual_seed(5))
    for noise in (0.0, 0.05, 0.15):
        metric.reset()
        metric.update(train[index] + noise * gaussian_data(500, 6))
        assert float(metric.compute()["data_copying_ct"]) < -3, noise
    fresh = []
    for draw in range(20):
        metric.reset()
        metric.update(gaussian_data(500, 100 + draw))
        fresh.append(float(metric.compute()["data_copying_ct"]))
    assert abs(np.mean(fresh)) < 0.5 and np.std(fresh) < 1.5, fresh


def test_copies_are_flagged_and_fresh_data_are_not_on_digits():
    """Pixels of the 8x8 digits: the model's training set is part of the data's training split, the
    fresh samples come from the rest of it, never seen by the metric."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32).div(8).sub(1)[:, None]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, heldout, rest = images[order[:800]], images[order[800:1100]], images[order[1100:]]
    metric = DataCopying(train, heldout, seed=0)
    gen = torch.Generator().manual_seed(1)
    for noise in (0.0, 0.1, 0.2):
        metric.reset()
        copies = train[torch.randint(len(train), (400,), generator=gen)]
        metric.update(copies + noise * torch.randn(copies.shape, generator=gen))
        assert float(metric.compute()["data_copying_ct"]) < -3, noise
    fresh = []
    for _ in range(10):
        metric.reset()
        metric.update(rest[torch.randperm(len(rest), generator=gen)[:400]])
        fresh.append(float(metric.compute()["data_copying_ct"]))
    assert abs(np.mean(fresh)) < 0.5 and np.std(fresh) < 1.5, fresh


def test_too_few_samples_in_every_cell_gives_nan_not_a_number_that_looks_like_a_result():
    train, heldout = gaussian_data(300, 0), gaussian_data(200, 1)
    metric = DataCopying(train, heldout, num_cells=4, min_cell_samples=20)
    metric.update(gaussian_data(30, 2))
    values = metric.compute()
    assert np.isnan(float(values["data_copying_ct"])) and float(values["data_copying_cells"]) == 0


def scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def numpy_precision_recall(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    def radii(a):
        d = scipy.spatial.distance.cdist(a, a)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(q, s, r):
        return float((scipy.spatial.distance.cdist(q, s) <= r[None, :]).any(1).mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_heldout_comparison_at_equal_size_against_independent_computations():
    train, heldout = gaussian_data(400, 0), gaussian_data(150, 1)
    samples = gaussian_data(300, 2) * 1.2
    metric = HeldoutComparison(train, heldout, bootstrap=50, seed=3)
    metric.update(samples[:100])
    metric.update(samples[100:])
    values = {k: float(v) for k, v in metric.compute().items()}
    assert values["heldout_compared"] == 150
    # The same subsample the metric draws (seeded), scored by scipy and numpy.
    from lightning_diff.metrics.distances import random_rows

    fake = random_rows(samples, 150, 3).double().numpy()
    real = heldout.double().numpy()
    assert values["fd_raw_vs_heldout"] == pytest.approx(scipy_fd(fake, real), rel=1e-6)
    assert values["kid_raw_vs_heldout"] == pytest.approx(numpy_kid(real, fake), rel=1e-6)
    precision, recall = numpy_precision_recall(fake, real, 3)
    assert values["precision_raw"] == pytest.approx(precision) and values["recall_raw"] == pytest.approx(
        recall
    )
    floor = random_rows(random_rows(train, 150, 3), 150, 5).double().numpy()
    assert values["fd_raw_vs_heldout_floor"] == pytest.approx(scipy_fd(floor, real), rel=1e-6)
    for key in ("fd_raw_vs_heldout", "kid_raw_vs_heldout"):
        assert values[f"{key}_ci_low"] <= values[key] <= values[f"{key}_ci_high"], key


def test_two_halves_of_one_data_set_score_near_the_floor():
    data = gaussian_data(2000, 7, dim=6)
    train, heldout, samples = data[:1000], data[1000:1500], data[1500:]
    metric = HeldoutComparison(train, heldout, bootstrap=100, seed=0)
    metric.update(samples)
    values = {k: float(v) for k, v in metric.compute().items()}
    fd, floor = values["fd_raw_vs_heldout"], values["fd_raw_vs_heldout_floor"]
    assert values["fd_raw_vs_heldout_ci_low"] <= floor <= values["fd_raw_vs_heldout_ci_high"]
    assert abs(fd - floor) < 0.1 and fd < 0.2
    assert (
        values["kid_raw_vs_heldout_ci_low"]
        <= values["kid_raw_vs_heldout_floor"]
        <= values["kid_raw_vs_heldout_ci_high"]
    )
    # A shifted set is outside the interval of the fresh one.
    metric.reset()
    metric.update(samples + 0.5)
    shifted = {k: float(v) for k, v in metric.compute().items()}
    assert shifted["fd_raw_vs_heldout_ci_low"] > values["fd_raw_vs_heldout_ci_high"]


def test_resampled_mmd_leaves_out_pairs_of_copies():
    x, y = gaussian_data(30, 0), gaussian_data(40, 1) + 0.3
    i = torch.randint(30, (30,), generator=torch.Generator().manual_seed(0))
    j = torch.randint(40, (40,), generator=torch.Generator().manual_seed(1))
    d = x.shape[1]
    k = lambda a, b: (a.double() @ b.double().T / d + 1).pow(3)  # noqa: E731
    got = float(resampled_mmd(k(x, x), k(y, y), k(x, y), i, j))
    xs, ys = x[i].double(), y[j].double()
    same_x, same_y = i[:, None] == i[None, :], j[:, None] == j[None, :]
    within_x = k(xs, xs)[~same_x].mean()
    within_y = k(ys, ys)[~same_y].mean()
    assert got == pytest.approx(float(within_x + within_y - 2 * k(xs, ys).mean()), rel=1e-9)


def test_precision_recall_of_a_set_with_itself_is_one_and_of_a_far_set_zero():
    x = gaussian_data(200, 0)
    assert precision_recall(x, x, 3) == (1.0, 1.0)
    assert precision_recall(x + 100.0, x, 3) == (0.0, 0.0)


def test_subsampling_to_the_heldout_size_is_said_once(caplog):
    import logging

    metric = HeldoutComparison(gaussian_data(200, 0), gaussian_data(50, 1), bootstrap=5)
    metric.update(gaussian_data(120, 2))
    with caplog.at_level(logging.INFO, logger="lightning_diff"):
        metric.compute()
        metric.compute()
    said = [r.getMessage() for r in caplog.records if "subsampled" in r.getMessage()]
    assert len(said) == 1 and "at 50 points a side" in said[0] and "120 samples" in said[0]
    assert "held-out split (50) and the training set (200)" in said[0]  # the whole set, not the kept rows


def test_a_training_set_smaller_than_the_heldout_split_sets_the_size_of_every_side():
    """A memorization study's 32 training points: the floor can only use 32, so all sides use 32."""
    train, heldout = gaussian_data(32, 0), gaussian_data(400, 1)
    metric = HeldoutComparison(train, heldout, bootstrap=0, seed=0)
    metric.update(gaussian_data(500, 2))
    values = {k: float(v) for k, v in metric.compute().items()}
    assert values["heldout_compared"] == 32
    from lightning_diff.metrics.distances import random_rows

    real = random_rows(heldout, 32, 1).double().numpy()
    assert values["fd_raw_vs_heldout_floor"] == pytest.approx(
        scipy_fd(train.double().numpy(), real), rel=1e-6
    )
