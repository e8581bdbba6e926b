"""The kernel WPO family: precision field, the LightningModule, and what the fitted model learns.

Answers are independent of the code under test: closed-form Gaussian scores, the circle's tangent
directions, the training-set nearest-neighbour ratio of the memorization metric.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_train
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_diff.checkpoints import build_family_net, load_model
from lightning_diff.diffusion.closed_form import EmpiricalDenoiser
from lightning_diff.diffusion.kernel_score import KernelScore
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.diffusion.samplers import Sampler, sample_ddim
from lightning_diff.errors import ConfigError
from lightning_diff.metrics.memorization import Memorization
from lightning_diff.models.diffusion_module import CHECKPOINT_KEY
from lightning_diff.models.kernel_wpo import KernelWPO
from lightning_diff.nets.precision import FORMS, PrecisionField


def _fit(model: KernelWPO, train: torch.Tensor, steps: int, lr: float = 5e-3, batch: int = 128, seed=0):
    """Adam on the model's own loss over shuffled mini-batches (what ``trainer.fit`` does, minus I/O)."""
    opt = torch.optim.Adam(model.net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(train.shape[0], generator=gen)[:batch]
        loss = model.loss(train[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.data_changed()
    return loss.item()


def _sample(model: KernelWPO, n: int, steps: int = 100, seed: int = 0) -> torch.Tensor:
    sampler = Sampler(sample_ddim, num_steps=steps)
    x, _ = model.sample(
        n, (model.centers.shape[1],), sampler, SampleGenerators(range(n), seed), use_ema=False
    )
    return x


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("amortized", [True, False])
def test_field_builds_the_stated_precision(form, amortized):
    torch.manual_seed(0)
    field = PrecisionField((3,), form=form, rank=2, floor=0.05, amortized=amortized)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y = torch.randn(5, 3)
    log_diag, factors = field(y)
    prec = field.precision_matrices(y)
    assert prec.shape == (5, 3, 3)
    torch.testing.assert_close(prec, prec.mT, atol=1e-4, rtol=1e-4)  # tangent: a float32 inverse
    if form == "tangent":  # P^{-1} = diag(1 / (2 floor + exp(a))) + W W^T, with |W|_F^2 < 1 / (2 floor)
        cov = torch.diag_embed((-log_diag).exp()) + factors @ factors.mT
        torch.testing.assert_close(prec @ cov, torch.eye(3).expand(5, 3, 3), atol=1e-3, rtol=0)
        assert (log_diag.exp() >= 0.1 - 1e-6).all()
        assert (factors.square().sum((1, 2)) < 10).all()
        assert torch.linalg.eigvalsh(prec).min() >= 0.05 - 1e-6
    else:
        assert torch.linalg.eigvalsh(prec).min() >= 0.05 - 1e-6  # the floor bounds every direction
    if form == "full":
        assert torch.equal(factors, factors.tril())  # a Cholesky-type factor
        torch.testing.assert_close(prec, 0.05 * torch.eye(3) + factors @ factors.mT)
    if form == "isotropic":
        torch.testing.assert_close(prec, log_diag.exp()[:, :, None] * torch.eye(3))
    if not amortized:  # one shared precision
        torch.testing.assert_close(prec, prec[:1].expand_as(prec))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("scale", [0.0, 10.0])
def test_every_form_keeps_every_kernel_within_the_variance_cap(form, scale):
    # model.max_variance bounds the largest covariance eigenvalue of every kernel the model samples
    # from, whatever the network outputs (scale 10: far beyond anything a fit reaches).
    torch.manual_seed(0)
    train = torch.randn(40, 3, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)
    field = PrecisionField((3,), form=form, rank=2, floor=1e-4).double()
    model = KernelWPO(field, max_variance=0.5, bandwidth=0.3)
    model.fit_data(train)
    with torch.no_grad():  # random network weights, and outputs moved by up to a few times `scale`
        for p in field.parameters():
            p.add_(0.3 * torch.randn_like(p))
        field.body[-1].bias.add_(scale * torch.randn_like(field.body[-1].bias))
    kernel = model.kernel(field)
    if kernel.covariance_factors:
        top = torch.linalg.eigvalsh(kernel.covariances()).max().item()
    else:  # precisions of up to exp(30): covariance is 1 / their smallest eigenvalue
        top = 1 / torch.linalg.eigvalsh(kernel.precision_matrices()).min().item()
    assert top <= 0.5 * (1 + 1e-9)
    if form == "tangent" and scale > 0:  # the unshrunk factors alone would be far wider than the cap
        raw = field.body((model.centers - field.shift) / field.scale)[:, field.diag_width :]
        assert raw.square().sum(1).max() > 50 and top > 0.4


@pytest.mark.parametrize("form", FORMS)
def test_initial_precision_is_the_bandwidth(form):
    field = PrecisionField((4,), form=form, rank=2, floor=0.01, amortized=False)
    field.initialise(bandwidth=0.5)
    prec = field.precision_matrices(torch.zeros(1, 4))[0].detach()
    target = torch.eye(4) / 0.25
    if form in ("lowrank", "tangent"):  # small random factors on top of the diagonal
        torch.testing.assert_close(prec.diagonal(), target.diagonal(), rtol=0.1, atol=0)
    else:
        torch.testing.assert_close(prec, target, rtol=1e-5, atol=1e-5)


def test_field_rejects_bad_settings():
    with pytest.raises(ConfigError, match="net.form"):
        PrecisionField((2,), form="banded")
    with pytest.raises(ConfigError, match="net.floor"):
        PrecisionField((2,), form="full", floor=0.0)
    with pytest.raises(ConfigError, match="net.rank"):
        PrecisionField((2,), form="lowrank", rank=3)


@pytest.mark.parametrize("form", FORMS)
def test_kernel_of_a_field_is_the_mixture_score(form):
    # Score of (1/N) sum_i N(y_i, P(y_i)^{-1} + sigma^2 I) by autograd of torch's densities.
    torch.manual_seed(0)
    field = PrecisionField((3,), form=form, rank=2, floor=0.2).double()
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.2 * torch.randn_like(p))
    centres = torch.randn(9, 3, dtype=torch.float64)
    model = KernelWPO(field, chunk_size=4)
    model.centers = centres
    kernel = model.kernel(field)
    cov = torch.linalg.inv(field.precision_matrices(centres)).detach()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    for sigma in (0.0, 0.7):
        comp = torch.distributions.MultivariateNormal(centres, cov + sigma**2 * torch.eye(3))
        ref = torch.logsumexp(comp.log_prob(x[:, None]), 1) - math.log(9)
        (grad,) = torch.autograd.grad(ref.sum(), x)
        with torch.no_grad():
            torch.testing.assert_close(kernel.score(x, sigma), grad)
            torch.testing.assert_close(kernel.log_density(x, sigma), ref)


@pytest.mark.parametrize("top_k", [None, 4])
def test_self_exclusion_is_leave_one_out_on_the_centres(top_k):
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    k = KernelScore(y, "lowrank", rank=2, bandwidth=0.6, init_scale=0.5, chunk_size=5, top_k=top_k)
    with torch.no_grad():
        loo = k.hyvarinen(y, 0.0, exclude=torch.arange(12))
        own = k.hyvarinen(y, 0.0, exclude_self=True)
        kept = k.hyvarinen(y, 0.0)  # each point also scored by its own kernel
        fresh = torch.randn(4, 3, generator=gen, dtype=torch.float64)  # not centres: nothing left out
        torch.testing.assert_close(k.hyvarinen(fresh, 0.0, exclude_self=True), k.hyvarinen(fresh, 0.0))
    torch.testing.assert_close(own, loo)
    assert not torch.allclose(kept, own)


def test_chunked_field_kernel_equals_unchunked():
    torch.manual_seed(1)
    train = torch.randn(40, 3)
    models = []
    for chunk in (7, 1024):
        m = KernelWPO(PrecisionField((3,), form="full"), chunk_size=chunk)
        m.fit_data(train)
        models.append(m)
    models[1].net.load_state_dict(models[0].net.state_dict())
    x = torch.randn(10, 3)
    with torch.no_grad():
        torch.testing.assert_close(models[0].loss(x), models[1].loss(x))
        sigma = torch.full((10,), 0.3)
        torch.testing.assert_close(models[0].denoiser(False)(x, sigma), models[1].denoiser(False)(x, sigma))


def test_fitted_model_matches_a_gaussian_score_and_moments():
    # 400 draws of N(mu, Sigma) in 2-D. The fitted mixture's noised score is compared with the closed
    # form -(Sigma + sigma^2 I)^{-1} (x - mu) at points of the noised distribution. 400 points limit
    # any estimate: the training set's own (empirical) score is off by about 24% (RMS, relative) at
    # sigma = 0.5 and 8% at sigma = 1. The kernels add their width to sigma^2 (a small bias), so the
    # fitted model must stay under 30% / 15% and within 1.6 times the empirical error; its samples
    # must have the data's moments within sampling error plus that widening.
    torch.manual_seed(0)  # the field's initial weights
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([1.0, -0.5])
    chol = torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    sigma_data = chol @ chol.T
    train = mu + torch.randn(400, 2, generator=gen) @ chol.T
    model = KernelWPO(PrecisionField((2,), form="full", seed=0))
    model.fit_data(train)
    _fit(model, train, steps=150, lr=3e-3)
    empirical = EmpiricalDenoiser(train.double())

    def rel_error(score, exact):
        return ((score - exact).norm(dim=1) ** 2).mean().sqrt() / (exact.norm(dim=1) ** 2).mean().sqrt()

    for sigma, bound in ((0.5, 0.3), (1.0, 0.15)):
        cov = sigma_data + sigma**2 * torch.eye(2)
        x = mu + torch.randn(2000, 2, generator=gen) @ torch.linalg.cholesky(cov).T
        exact = -(x - mu) @ torch.linalg.inv(cov).T
        s = torch.full((2000,), sigma, dtype=torch.float64)
        with torch.no_grad():
            got = model.denoiser(False).score(x, sigma)
            emp = ((empirical(x.double(), s) - x.double()) / sigma**2).float()
        assert rel_error(got, exact) < min(bound, 1.6 * rel_error(emp, exact)), sigma
    samples = _sample(model, 2000)
    assert (samples.mean(0) - mu).norm() < 0.12
    torch.testing.assert_close(torch.cov(samples.T), sigma_data, rtol=0, atol=0.15)


def test_fitted_precisions_follow_the_circle():
    # Points on the unit circle: a learned kernel should be long along the tangent and short across
    # the circle (manifold learning), and samples should stay closer to the circle than those of the
    # isotropic kernels the fit starts from.
    gen = torch.Generator().manual_seed(1)
    angle = 2 * math.pi * torch.rand(200, generator=gen)
    train = torch.stack([angle.cos(), angle.sin()], 1)
    model = KernelWPO(PrecisionField((2,), form="full", seed=0))
    model.fit_data(train)
    start = _sample(model, 1000)
    _fit(model, train, steps=300, lr=3e-3, batch=200)
    with torch.no_grad():
        prec = model.net.precision_matrices(train)
    evals, evecs = torch.linalg.eigh(prec)
    long_axis = evecs[:, :, 0]  # smallest precision = largest variance
    tangent = torch.stack([-train[:, 1], train[:, 0]], 1)
    aligned = (long_axis * tangent).sum(1).abs()
    assert (aligned > 0.9).float().mean() > 0.9, aligned.median()
    assert (evals[:, 1] / evals[:, 0]).median() > 10  # clearly anisotropic
    samples = _sample(model, 1000)
    off = (samples.norm(dim=1) - 1).abs().mean()
    off_start = (start.norm(dim=1) - 1).abs().mean()
    assert off < 0.1 * off_start, (off, off_start)


def test_sharp_kernels_memorize_and_the_fitted_model_does_not():
    # As every precision grows without bound the score becomes the training set's empirical score
    # and samples land on training points; the fitted model's samples mostly do not.
    gen = torch.Generator().manual_seed(2)
    train = torch.randn(60, 2, generator=gen)
    sharp = KernelWPO(PrecisionField((2,), form="isotropic", amortized=False, floor=0.0), bandwidth=1e-3)
    sharp.fit_data(train)
    x = torch.randn(50, 2, generator=gen)
    sig = torch.full((50,), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(
            sharp.denoiser(False)(x, sig), EmpiricalDenoiser(train)(x, sig), atol=1e-4, rtol=0
        )
    fitted = KernelWPO(PrecisionField((2,), form="full"))
    fitted.fit_data(train)
    _fit(fitted, train, steps=150, batch=60)
    fractions = []
    for model in (sharp, fitted):
        metric = Memorization(train)
        metric.update(_sample(model, 500))
        fractions.append(metric.compute()["memorized_fraction"].item())
    assert fractions[0] > 0.95, fractions
    assert fractions[1] < 0.5 * fractions[0], fractions


def test_model_rejects_bad_settings():
    with pytest.raises(ConfigError, match="net=precision_field|precision field"):
        KernelWPO(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="model.num_centers"):
        KernelWPO(PrecisionField((2,)), num_centers=1)
    with pytest.raises(ConfigError, match="model.dtype"):
        KernelWPO(PrecisionField((2,)), dtype="float16")
    with pytest.raises(ConfigError, match="not been fitted"):
        KernelWPO(PrecisionField((2,))).denoiser()


def test_subset_of_centres_is_seeded_and_drawn_from_the_data():
    train = torch.randn(50, 2)
    a, b = (KernelWPO(PrecisionField((2,)), num_centers=10, center_seed=3) for _ in range(2))
    a.fit_data(train)
    b.fit_data(train)
    assert a.centers.shape == (10, 2)
    assert torch.equal(a.centers, b.centers)
    assert all((train.double() == c).all(1).any() for c in a.centers)


def test_ld_train_fits_samples_and_reloads(tiny_train, tmp_path):
    metrics, objects = tiny_train(
        ["model=kernel_wpo", "data=moons", "data.num_train=64", "data.num_samples=200"], tmp_path
    )
    assert math.isfinite(metrics["train/loss"])
    assert (tmp_path / "samples").is_dir() and any((tmp_path / "samples").iterdir())
    model, cfg = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, KernelWPO) and cfg.net.form == "full"
    assert torch.equal(model.centers, objects["model"].centers.cpu())
    x = torch.randn(5, 2)
    sigma = torch.full((5,), 0.4)
    with torch.no_grad():
        expected = objects["model"].cpu().denoiser()(x, sigma)
        torch.testing.assert_close(model.denoiser()(x, sigma), expected)

    # A checkpoint written when the precision field lived under model.net (before net=precision_field)
    # loads into the same model.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    stored = ckpt[CHECKPOINT_KEY]["config"]
    stored["model"]["net"] = stored.pop("net")
    stored["net"] = OmegaConf.to_container(compose_train([]).net)  # the default group stood beside it
    torch.save(ckpt, tmp_path / "old_layout.ckpt")
    old, old_cfg = load_model(tmp_path / "old_layout.ckpt")
    assert isinstance(old.net, PrecisionField) and "net" not in old_cfg.model
    with torch.no_grad():
        torch.testing.assert_close(old.denoiser()(x, sigma), expected)


def test_kernel_wpo_configs_compose():
    for extra in (["data=moons"], ["data=circle", "net.form=lowrank"], ["data=digits"]):
        cfg = compose_train(["model=kernel_wpo", *extra])
        assert cfg.model._target_.endswith("KernelWPO")
        assert cfg.net._target_.endswith("PrecisionField")
    assert compose_train(["model=kernel_wpo", "data=circle", "net.form=lowrank"]).net.form == "lowrank"
    assert compose_train(["model=ddpm"]).net._target_.endswith("build_net")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=kernel_wpo", "net=mlp"], "model=kernel_wpo needs net=precision_field"),
        (["model=ddpm", "net=precision_field"], "net=precision_field is the kernel model's net"),
        (["model=score_sde", "net=precision_field"], "net=precision_field is the kernel model's net"),
    ],
)
def test_a_family_and_a_net_that_do_not_fit_are_refused(overrides, message):
    cfg = compose_train(["data=moons", *overrides])
    with pytest.raises(InstantiationException) as caught:  # ld-train prints its cause in one line
        instantiate(cfg.model, net=build_family_net(cfg, (2,)))
    assert isinstance(caught.value.__cause__, ConfigError) and message in str(caught.value.__cause__)
