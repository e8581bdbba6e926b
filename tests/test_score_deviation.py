"""Score deviation from reference scores: zero against itself, closed-form Gaussian answers, the
empirical score's limits, split invariance, and the training callback's outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_train
from torch import Tensor

from lightning_diff.callbacks.gaussian_deviation import default_sigmas, log_spaced_steps
from lightning_diff.diffusion.denoisers import Denoiser, GaussianDenoiser
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.metrics.score_deviation import ScoreDeviation


class DeltaMixture(Denoiser):
    """The exact denoiser of the training set itself: softmax-weighted mean of the training points."""

    def __init__(self, points: Tensor):
        super().__init__()
        self.register_buffer("points", points.reshape(points.shape[0], -1).double())

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).double()
        logits = -torch.cdist(flat, self.points).pow(2) / (2 * sigma.double()[:, None] ** 2)
        return (logits.softmax(-1) @ self.points).reshape(x.shape).to(x.dtype)


def two_moons_like(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    return torch.stack([x, y], 1) + 0.05 * torch.randn(n, 2, generator=g)


def test_gaussian_model_has_zero_deviation_from_itself():
    train = two_moons_like(200, 0)
    gauss = GaussianDenoiser.from_data(train)
    sigmas = [0.01, 0.1, 1.0, 10.0]
    metric = ScoreDeviation(sigmas, {"gaussian": gauss})
    metric.update(gauss, two_moons_like(64, 1), torch.Generator().manual_seed(0))
    out = metric.compute()["gaussian"]
    assert out["deviation"].tolist() == [0.0] * 4 and out["relative_error"].tolist() == [0.0] * 4
    assert out["ev"].tolist() == [1.0] * 4


def test_empirical_score_approaches_gaussian_score_at_high_noise():
    train = two_moons_like(128, 0)
    sigmas = np.geomspace(0.01, 100, 9).tolist()
    metric = ScoreDeviation(sigmas, {"gaussian": GaussianDenoiser.from_data(train)})
    metric.update(DeltaMixture(train), two_moons_like(256, 1), SampleGenerators(range(256), seed=3))
    dev = metric.compute()["gaussian"]["deviation"]
    assert dev[0] > 0.5  # at low noise the memorizing score points at single training points
    assert dev[-1] < 1e-3 and dev[-2] < 1e-2  # far above the data scale both are -(x - mu) / sigma^2
    assert (dev[3:].diff() < 0).all()  # decreasing once sigma reaches the data scale
    assert dev[:3].max() > 10 * dev[5]


def test_ev_matches_closed_form_for_gaussian_data_and_gaussian_model():
    # Data N(0, diag(a)), model the exact denoiser of N(0, diag(b)): per coordinate both scores are
    # linear, s = -x / (c + sigma^2), and x_k ~ N(0, a_k + sigma^2), so
    # E||s_b - s_a||^2 = sum (a + s2) (1/(b + s2) - 1/(a + s2))^2 and E||s_b||^2 = sum (a + s2) / (b + s2)^2.
    a = torch.tensor([0.2, 1.0, 3.0, 0.05], dtype=torch.float64)
    b = torch.tensor([0.5, 0.7, 1.0, 0.3], dtype=torch.float64)
    sigmas = [0.05, 0.3, 1.0, 3.0]
    n = 20000
    x0 = (
        torch.randn(n, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * a.sqrt()
    ).float()
    data_ref = GaussianDenoiser(torch.zeros(4), torch.diag(a))
    model = GaussianDenoiser(torch.zeros(4), torch.diag(b))
    metric = ScoreDeviation(sigmas, {"true": data_ref})
    metric.update(model, x0, torch.Generator().manual_seed(1))
    out = metric.compute()["true"]
    for j, s in enumerate(sigmas):
        var = a + s**2
        err = (var * (1 / (b + s**2) - 1 / var) ** 2).sum()
        model_norm = (var / (b + s**2) ** 2).sum()
        ref_norm = (1 / var).sum()
        assert out["pooled_deviation"][j].item() == pytest.approx(float(err / model_norm), rel=0.03)
        assert out["ev"][j].item() == pytest.approx(1 - out["deviation"][j].item())
        assert out["relative_error"][j].item() == pytest.approx(float(err / ref_norm), rel=0.03)
    # The paper's per-sample mean, from the closed-form scores on the metric's own noise draws
    # (one torch.randn per sigma, in grid order, from the generator it was handed).
    gen = torch.Generator().manual_seed(1)
    for j, s in enumerate(sigmas):
        x = (x0 + s * torch.randn(x0.shape, generator=gen)).double()
        s_model, s_true = -x / (b + s**2), -x / (a + s**2)
        ratio = ((s_model - s_true) ** 2).sum(1) / (s_model**2).sum(1)
        assert out["deviation"][j].item() == pytest.approx(ratio.mean().item(), rel=1e-6)


def test_per_sample_deviation_of_isotropic_gaussians_is_the_closed_form():
    # Data N(0, a I), model N(0, b I): every sample's ratio is (1 - (b + s^2) / (a + s^2))^2 exactly,
    # while the pooled ratio of sums is the same number; a mixture of scales separates the two.
    a, b, sigmas = 0.4, 1.5, [0.1, 1.0, 4.0]
    x0 = torch.randn(500, 3, generator=torch.Generator().manual_seed(0)) * a**0.5
    metric = ScoreDeviation(sigmas, {"true": GaussianDenoiser(torch.zeros(3), a * torch.eye(3))})
    metric.update(GaussianDenoiser(torch.zeros(3), b * torch.eye(3)), x0, torch.Generator().manual_seed(2))
    out = metric.compute()["true"]
    for j, s in enumerate(sigmas):
        expected = (1 - (b + s**2) / (a + s**2)) ** 2
        assert out["deviation"][j].item() == pytest.approx(expected, rel=1e-5)
        assert out["pooled_deviation"][j].item() == pytest.approx(expected, rel=1e-5)


def test_value_does_not_depend_on_how_rows_are_split():
    train = two_moons_like(64, 0)
    heldout = two_moons_like(40, 1)
    refs = {"gaussian": GaussianDenoiser.from_data(train), "empirical": DeltaMixture(train)}
    model = GaussianDenoiser.from_data(two_moons_like(64, 2))
    sigmas = [0.05, 0.5, 5.0]
    whole = ScoreDeviation(sigmas, refs)
    whole.update(model, heldout, SampleGenerators(range(40), seed=7))
    # Two "ranks", each with its own rows and per-sample seeds; rank 1 in two batches.
    first, second = ScoreDeviation(sigmas, refs), ScoreDeviation(sigmas, refs)
    first.update(model, heldout[:17], SampleGenerators(range(17), seed=7))
    second.update(model, heldout[17:30], SampleGenerators(range(17, 30), seed=7))
    second.update(model, heldout[30:], SampleGenerators(range(30, 40), seed=7))
    first.merge_state(second)
    expected, merged = whole.compute(), first.compute()
    for name in refs:
        for key in ("ev", "deviation", "pooled_deviation", "relative_error"):
            torch.testing.assert_close(merged[name][key], expected[name][key], rtol=1e-9, atol=1e-12)


def test_default_sigmas_follow_the_schedule_range():
    class Schedule:
        sigma_min, sigma_max = 0.002, 10.0

    grid = default_sigmas(Schedule())
    assert len(grid) == 16 and grid[0] == pytest.approx(0.01) and grid[-1] == pytest.approx(10.0)
    assert default_sigmas()[-1] == pytest.approx(80.0)


def test_log_spaced_steps_cover_training():
    assert log_spaced_steps(6, 800) == [8, 20, 50, 127, 318, 800]  # 8 x 10^(2k/5), rounded
    assert log_spaced_steps(8, 5) == [1, 2, 3, 4, 5]  # fewer when rounding makes neighbours equal
    assert log_spaced_steps(3, 1000, first=10) == [10, 100, 1000]


@pytest.mark.parametrize("points", ["train", "heldout"])
def test_callback_on_the_gaussian_model_has_zero_deviation_from_the_gaussian(tmp_path, points):
    # model=gaussian is the training set's Gaussian, the callback's "gaussian" reference: deviation 0
    # on either set of points, while the empirical score differs at low noise.
    from lightning_diff.cli.train import train

    overrides = [
        "data=moons",
        "model=gaussian",
        "trainer.max_steps=1",
        "callbacks=with_deviation",
        f"callbacks.score_deviation.points={points}",
        "callbacks.score_deviation.num_samples=32",
        "callbacks.score_deviation.sigmas=[0.05,0.5,5.0]",
        "callbacks.score_deviation.references=[gaussian,empirical]",
    ]
    metrics, _ = train(compose_train(overrides, tmp_path / "run"))
    for prefix in ("deviation", "deviation_pooled"):
        for s in ("0.05", "0.5", "5"):
            assert metrics[f"{prefix}/gaussian/sigma_{s}"] < 1e-10
        assert metrics[f"{prefix}/empirical/sigma_0.05"] > 0.5


def test_callback_writes_scalars_and_plot(tmp_path):
    from lightning_diff.cli.train import train

    run_dir = tmp_path / "run"
    overrides = [
        "data=moons",
        "trainer.max_steps=4",
        "callbacks=with_deviation",
        "callbacks.score_deviation.log_spaced=2",
        "callbacks.score_deviation.num_samples=16",
        "callbacks.score_deviation.sigmas=[0.05,0.5,5.0]",
        "callbacks.score_deviation.references=[gaussian]",
    ]
    metrics, objects = train(compose_train(overrides, run_dir))
    saved = json.loads((run_dir / "metrics.json").read_text())
    keys = [f"deviation/gaussian/sigma_{s}" for s in ("0.05", "0.5", "5")] + ["deviation/gaussian/mean"]
    for key in keys:
        assert math.isfinite(saved[key]) and saved[key] >= 0, key
        assert metrics[key] == pytest.approx(saved[key])
    plots = sorted(p.name for p in (run_dir / "eval").glob("score_deviation_*.png"))
    assert plots == ["score_deviation_step_0000001.png", "score_deviation_step_0000004.png"]
    callback = next(c for c in objects["trainer"].callbacks if hasattr(c, "history"))
    assert [step for step, _ in callback.history] == [1, 4]  # log_spaced=2 over 4 steps


def test_references_fall_back_to_the_gaussian_when_analytic_is_missing(monkeypatch, caplog):
    import sys

    from lightning_diff.callbacks.gaussian_deviation import build_references

    monkeypatch.setitem(sys.modules, "lightning_diff.diffusion.closed_form", None)  # import fails
    with caplog.at_level("WARNING"):
        refs = build_references(["gaussian", "gmm", "empirical"], two_moons_like(32, 0))
    assert list(refs) == ["gaussian"] and "Gaussian reference only" in caplog.text
