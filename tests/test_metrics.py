"""Metrics against independent computations, closed forms and planted answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from lightning_diff.metrics import (
    MMD,
    DataLogLikelihood,
    FrechetDistance,
    HistogramTV,
    KernelDistance,
    Memorization,
    SlicedWasserstein,
    frechet_distance,
    nearest_neighbour_ratio,
    nearest_neighbours,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = gen(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix + shift


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


# --- Frechet distance ---------------------------------------------------------------------------


def test_frechet_distance_matches_scipy_sqrtm():
    mu1, c1 = moments(correlated(400, 12, seed=1))
    mu2, c2 = moments(correlated(300, 12, seed=2, shift=0.3))
    covmean = linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum()) + np.trace(c1.numpy() + c2.numpy() - 2 * covmean)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    mu, cov = moments(correlated(500, 32, seed=3))
    value = frechet_distance(mu, cov, mu, cov)
    assert abs(value) < 1e-6 * float(torch.trace(cov))


def test_frechet_distance_singular_commuting_covariances():
    # tr sqrt(C1 C2) = sum sqrt(a_i b_i) for diagonal covariances, here with a zero variance.
    c1, c2 = torch.diag(torch.tensor([1.0, 0.0, 2.0])), torch.diag(torch.tensor([4.0, 1.0, 2.0]))
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(1 + 3 + 7 - 2 * (2 + 0 + 2), abs=1e-12)


def test_frechet_metric_matches_closed_form_for_gaussians():
    # N(0, diag(a)) against N(m, diag(b)): ||m||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a, b = torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.tensor([2.0, 1.0, 0.5, 1.0])
    m = torch.tensor([1.0, 0.0, -0.5, 0.0])
    exact = float(m.pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    n = 20000
    metric = FrechetDistance(feature_dim=4)
    metric.update(torch.randn(n, 4, generator=gen(4)) * a.sqrt(), real=True)
    metric.update(torch.randn(n, 4, generator=gen(5)) * b.sqrt() + m, real=False)
    assert float(metric.compute()) == pytest.approx(exact, abs=0.1)


def test_frechet_metric_accumulates_like_one_shot():
    real, fake = correlated(300, 6, seed=6), correlated(250, 6, seed=7, shift=0.5)
    one = FrechetDistance(feature_dim=6)
    one.update(real, real=True)
    one.update(fake, real=False)
    many = FrechetDistance(feature_dim=6)
    for chunk in real.split(70):
        many.update(chunk, real=True)
    for chunk in fake.split(33):
        many.update(chunk, real=False)
    torch.testing.assert_close(many.compute(), one.compute(), rtol=1e-9, atol=1e-12)
    mu1, c1 = moments(real)
    mu2, c2 = moments(fake)
    assert float(one.compute()) == pytest.approx(frechet_distance(mu1, c1, mu2, c2), rel=1e-9)


class Projection(nn.Module):
    name = "toy"
    feature_dim = 3

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


def test_frechet_metric_names_reference_and_reset():
    real, fake = correlated(200, 8, seed=8).float(), correlated(150, 8, seed=9, shift=1.0).float()
    assert FrechetDistance(feature_dim=8).key == "fd_raw"
    torch.manual_seed(0)
    metric = FrechetDistance(Projection(), reset_real_features=False)
    assert (metric.key, metric.feature_dim) == ("fd_toy", 3)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    value = metric.compute()
    metric.reset()  # keeps the real side
    metric.update(fake, real=False)
    torch.testing.assert_close(metric.compute(), value)

    stats = metric.reference_stats()
    assert stats.n == 200 and stats.mean.shape == (3,) and stats.cov.shape == (3, 3)
    cached = FrechetDistance(metric.feature_extractor, reset_real_features=True)
    cached.set_reference(*stats)
    cached.update(fake, real=False)
    torch.testing.assert_close(cached.compute(), value)
    cached.reset()  # a loaded reference survives resets
    cached.update(fake, real=False)
    torch.testing.assert_close(cached.compute(), value)
    with pytest.raises(ValueError):
        cached.update(real, real=True)

    plain = FrechetDistance(feature_dim=8)
    plain.update(real, real=True)
    plain.reset()
    assert int(plain.real_n) == 0
    with pytest.raises(ValueError):
        FrechetDistance()


# --- Kernel distance --------------------------------------------------------------------------


def test_kernel_distance_zero_for_same_distribution_positive_for_shift():
    g = gen(10)
    real, same = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g)
    shifted = torch.randn(1000, 8, generator=g) + 0.5
    kid = KernelDistance(subsets=20, subset_size=200)
    assert kid.key == "kid_raw"
    kid.update(real, real=True)
    kid.update(same, real=False)
    mean, std = kid.compute()
    assert abs(float(mean)) < 3 * float(std) + 1e-3
    kid.reset()
    kid.update(real, real=True)
    kid.update(shifted, real=False)
    mean_shift, std_shift = kid.compute()
    assert float(mean_shift) > 5 * float(std_shift) > 0
    assert float(mean_shift) > 10 * abs(float(mean))


# --- Memorization -----------------------------------------------------------------------------


def test_nearest_neighbours_match_brute_force():
    g = gen(11)
    x, train = torch.randn(100, 1, 2, 3, generator=g), torch.randn(300, 1, 2, 3, generator=g)
    full = torch.cdist(x.reshape(100, -1).double(), train.reshape(300, -1).double())
    expected_d, expected_i = full.topk(3, dim=1, largest=False)
    for chunk_size in (1, 7, 64, 1000):
        d, i = nearest_neighbours(x, train, k=3, chunk_size=chunk_size)
        assert torch.equal(i, expected_i)
        torch.testing.assert_close(d.double(), expected_d, rtol=1e-5, atol=1e-5)
    nn1, ratio = nearest_neighbour_ratio(x, train, chunk_size=9)
    torch.testing.assert_close(nn1.double(), expected_d[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ratio.double(), expected_d[:, 0] / expected_d[:, 1], rtol=1e-5, atol=1e-6)


def test_nearest_neighbours_are_exact_for_near_copies():
    train = torch.rand(500, 64, generator=gen(12)) * 2 - 1
    noise = torch.randn(50, 64, generator=gen(13))
    noise = 1e-4 * noise / noise.norm(dim=1, keepdim=True)
    d, i = nearest_neighbours(train[:50] + noise, train, k=1)
    assert torch.equal(i[:, 0], torch.arange(50))
    torch.testing.assert_close(d[:, 0], torch.full((50,), 1e-4), rtol=0.05, atol=0)


def test_memorization_flags_planted_copies_only():
    g = gen(14)
    train = torch.randn(400, 1, 4, 4, generator=g)
    copies = train[:40] + 1e-3 * torch.randn(40, 1, 4, 4, generator=g)
    fresh = torch.randn(200, 1, 4, 4, generator=g)

    metric = Memorization(train, chunk_size=64, extraction_delta=0.1)
    metric.update(copies[:25])
    metric.update(copies[25:])
    out = metric.compute()
    assert float(out["memorized_fraction"]) == 1.0
    assert float(out["nn1_mean"]) < 0.01 and float(out["ratio_mean"]) < 0.01
    assert float(out["extracted_count"]) == 40
    samples, nearest = metric.pairs(5)
    assert torch.equal(nearest, samples)  # copy i came from training sample i
    hist = metric.histograms(bins=10)
    assert hist["ratio"][0].sum() == 40 and hist["ratio"][0][0] == 40
    assert hist["nn1"][0].sum() == 40 and len(hist["nn1"][1]) == 11

    metric.reset()
    metric.update(fresh)
    out = metric.compute()
    assert float(out["memorized_fraction"]) == 0.0
    assert 0.5 < float(out["ratio_mean"]) < 1.0
    assert float(out["extracted_count"]) == 0

    torch.manual_seed(0)
    features = Memorization(
        train, feature_extractor=nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), name="lin"
    )
    assert features.name == "lin" and features.train_features.shape == (400, 8)
    features.update(copies)
    assert float(features.compute()["memorized_fraction"]) == 1.0


# --- Vector metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric_cls", [SlicedWasserstein, MMD, HistogramTV])
def test_vector_metrics_zero_for_same_set_and_grow_with_shift(metric_cls):
    g = gen(15)
    reference = torch.randn(1500, 2, generator=g)
    same = metric_cls(reference)
    same.update(reference[:700])
    same.update(reference[700:])
    at_zero = float(same.compute())
    values = []
    for shift in (0.5, 1.0, 2.0):
        metric = metric_cls(reference)
        metric.update(torch.randn(1500, 2, generator=g) + shift)
        values.append(float(metric.compute()))
    assert abs(at_zero) < 0.02 * values[0]
    assert 0 < values[0] < values[1] < values[2]


def test_histogram_tv_extremes():
    reference = torch.rand(1000, 3, generator=gen(16))
    metric = HistogramTV(reference, bins=16)
    metric.update(reference)
    assert float(metric.compute()) == 0.0
    metric.reset()
    metric.update(reference + 5.0)
    assert float(metric.compute()) == 1.0
    one_d = HistogramTV(reference[:, :1], bins=8)
    one_d.update(reference[:, :1] - 5.0)
    assert float(one_d.compute()) == 1.0


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x.pow(2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def test_data_log_likelihood_is_the_mean_log_prob():
    x = torch.randn(333, 2, generator=gen(17)) * 1.5
    metric = DataLogLikelihood(standard_normal_log_prob)
    for chunk in x.split(100):
        metric.update(chunk)
    assert float(metric.compute()) == pytest.approx(float(standard_normal_log_prob(x).mean()), rel=1e-6)
