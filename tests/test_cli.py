"""The command line: ld-sample and ld-eval on a trained run, and one-line errors for bad input."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import compose_named, compose_train
from hydra.utils import instantiate
from omegaconf import open_dict
from wandb_records import history

from lightning_diff.checkpoints import load_model
from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.sample import sample
from lightning_diff.cli.train import train
from lightning_diff.diffusion import Sampler, sample_ancestral
from lightning_diff.errors import CheckpointError, ConfigError, DataError
from lightning_diff.generation import generate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    train(compose_train(["data=digits", "trainer.max_steps=3"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    """``model=gaussian`` fitted to the digits (nothing to train: one step): its last checkpoint and the
    training tensor it was fitted on."""
    run_dir = tmp_path_factory.mktemp("gaussian") / "run"
    _, objects = train(compose_train(["data=digits", "model=gaussian", "trainer.max_steps=1"], run_dir))
    return run_dir / "checkpoints" / "last.ckpt", objects["datamodule"].train_tensor()


def data_space_errors(samples: np.ndarray, data: torch.Tensor) -> tuple[float, float]:
    """How far ``samples`` are from ``data``'s moments, in standard errors of ``len(samples)`` draws of
    N(mean, cov) of ``data``: the largest per-pixel |mean difference| over the pixel's standard error,
    and the overall (all-pixel) standard deviation's difference over its standard error.

    The overall variance is the average over draws of ``v = |x - m 1|^2 / d`` (``m`` the data's grand
    mean); for Gaussian x, ``Var(v) = (2 tr(C^2) + 4 (mu - m 1)^T C (mu - m 1)) / d^2``, and the std's
    standard error is the variance's over twice the std (delta method)."""
    n = len(samples)
    flat = torch.from_numpy(samples).reshape(n, -1).double()
    real = data.reshape(len(data), -1).double()
    mu, d = real.mean(0), real.shape[1]
    centred = real - mu
    cov = centred.T @ centred / len(real)  # maximum likelihood: what the model was fitted to
    # Pixels that never change (the digits' corners) have no spread: 1e-6 covers float32 rounding.
    mean_se = (cov.diagonal() / n).sqrt().clamp(min=1e-6)
    mean_err = ((flat.mean(0) - mu).abs() / mean_se).max().item()
    grand = real.mean()
    std = (real - grand).pow(2).mean().sqrt()
    offset = mu - grand
    var_v = (2 * torch.trace(cov @ cov) + 4 * offset @ cov @ offset) / d**2
    std_se = (var_v / n).sqrt() / (2 * std)
    std_err = ((flat.std(correction=0) - std) / std_se).item()
    return mean_err, std_err


def test_sample_writes_images_in_data_space(ckpt, gaussian_run, tmp_path):
    out = tmp_path / "s.npy"
    array = sample(compose_named("sample", [f"ckpt={ckpt}", "num_samples=10", f"out={out}", "batch_size=4"]))
    saved = np.load(out)
    assert saved.shape == (10, 1, 8, 8) and saved.dtype == np.float32
    np.testing.assert_array_equal(saved, array)
    # Sample i depends only on (seed, i): a different batch size gives the same file.
    again = sample(compose_named("sample", [f"ckpt={ckpt}", "num_samples=10", f"out={out}", "batch_size=10"]))
    np.testing.assert_allclose(again, saved, rtol=1e-5, atol=1e-5)

    # Scale and space: the digits' Gaussian, sampled through ld-sample, gives back the moments of the
    # training images it was fitted on ([-1, 1], not [0, 1] nor a normalised space). Teleporting to
    # sigma_skip=0 follows the Gaussian flow in closed form down to the grid's last level (sigma = 0.01),
    # whose one denoising step shrinks each variance by lambda / (lambda + 1e-4): the overall std by
    # < 1e-4, against a standard error of 0.005 with 400 draws. (sampler=heun with the run's 5 steps is
    # 30% too wide here; exactness is what makes a tight tolerance possible.)
    gauss_ckpt, data = gaussian_run
    n = 400
    overrides = [f"ckpt={gauss_ckpt}", f"num_samples={n}", f"out={tmp_path / 'g.npy'}"]
    sample(compose_named("sample", [*overrides, "sampler=teleport_ddim", "sampler.sigma_skip=0"]))
    drawn = np.load(tmp_path / "g.npy")
    assert drawn.shape == (n, *data.shape[1:]) and drawn.dtype == np.float32
    # 64 pixel means: 4.5 standard errors keeps the chance that one of them exceeds it by chance
    # below 64 x 7e-6 = 5e-4; one overall std: 4 standard errors.
    mean_err, std_err = data_space_errors(drawn, data)
    assert mean_err < 4.5 and abs(std_err) < 4, (mean_err, std_err)
    # The same draws in another space fail both checks: doubled, or shifted into [0, 1]; and a 10%
    # wider spread about the right mean fails the std check.
    for wrong in (2 * drawn, (drawn + 1) / 2):
        wrong_mean, wrong_std = data_space_errors(wrong, data)
        assert wrong_mean > 4.5 and abs(wrong_std) > 4, (wrong_mean, wrong_std)
    mean = data.mean(0).numpy()
    assert abs(data_space_errors(mean + 1.1 * (drawn - mean), data)[1]) > 4


def test_sample_with_another_sampler_and_step_count(ckpt, tmp_path):
    overrides = [
        f"ckpt={ckpt}",
        "num_samples=4",
        f"out={tmp_path / 'a.npy'}",
        "sampler=ancestral",
        "num_steps=3",
    ]
    array = sample(compose_named("sample", overrides + [f"grid={tmp_path / 'g.png'}"]))
    assert array.shape == (4, 1, 8, 8) and (tmp_path / "g.png").is_file()
    # The same seeds through a sampler built by hand: three ancestral steps on DDIM's leading grid.
    model, _ = load_model(ckpt, "cpu")
    ancestral = functools.partial(sample_ancestral, variance="posterior")
    by_hand = Sampler(ancestral, num_steps=3, spacing="leading")
    expected, nfe = generate(model, range(4), (1, 8, 8), by_hand, seed=0)
    assert nfe == 3
    np.testing.assert_allclose(array, expected.numpy(), rtol=1e-5, atol=1e-6)
    default = sample(compose_named("sample", [f"ckpt={ckpt}", "num_samples=4", f"out={tmp_path / 'b.npy'}"]))
    assert np.abs(default - array).max() > 1e-2  # the default sampler (Heun) is another one


def test_sample_with_a_compiled_sampler_draws_the_eager_samples(ckpt, tmp_path, monkeypatch):
    """``sampler.compile=true`` through ld-sample (torch.compile with the aot_eager backend: it traces
    like the default one without generating code)."""
    real = torch.compile
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or real(m, backend="aot_eager"))
    base = [f"ckpt={ckpt}", "num_samples=4", "sampler=ddim", "num_steps=3"]
    eager = sample(compose_named("sample", base + [f"out={tmp_path / 'a.npy'}"]))
    assert calls == []
    compiled = sample(compose_named("sample", base + ["sampler.compile=true", f"out={tmp_path / 'b.npy'}"]))
    assert calls == [{}]
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    # compile= reaches the run's own sampler too (no sampler= given), here Heun
    own = [f"ckpt={ckpt}", "num_samples=4", "num_steps=3"]
    heun = sample(compose_named("sample", own + [f"out={tmp_path / 'c.npy'}"]))
    heun_compiled = sample(compose_named("sample", own + ["compile=true", f"out={tmp_path / 'd.npy'}"]))
    assert len(calls) == 2
    np.testing.assert_allclose(heun_compiled, heun, rtol=1e-5, atol=1e-5)
    assert np.abs(heun - eager).max() > 1e-3  # another sampler than DDIM


def test_eval_checkpoint_and_samples_file(ckpt, tmp_path):
    metrics = evaluate(
        compose_named("eval", [f"ckpt={ckpt}", "num_samples=20", f"out={tmp_path / 'm.json'}"])
    )
    assert metrics["nfe"] == 2 * 5 - 1 and np.isfinite(metrics["sliced_wasserstein"])  # Heun, 5 steps
    assert (
        json.loads((tmp_path / "m.json").read_text())["eval/sliced_wasserstein"]
        == metrics["sliced_wasserstein"]
    )

    # Scoring the held-out digits themselves: close to the data, and all "memorized" only if copied.
    from lightning_diff.data import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup("fit")
    np.save(tmp_path / "copies.npy", dm.train_tensor()[:50].numpy())
    copied = evaluate(compose_named("eval", [f"samples={tmp_path / 'copies.npy'}", "data=digits"]))
    assert copied["memorized_fraction"] == 1.0 and copied["nn1_mean"] < 1e-4
    np.save(tmp_path / "noise.npy", torch.rand(50, 1, 8, 8).mul(2).sub(1).numpy())
    noise = evaluate(compose_named("eval", [f"samples={tmp_path / 'noise.npy'}", "data=digits"]))
    assert noise["memorized_fraction"] == 0.0 and noise["sliced_wasserstein"] > copied["sliced_wasserstein"]
    # Training images score a smaller Frechet distance in digits-classifier space than noise does.
    assert 0 <= copied["fd_digits_cnn"] < noise["fd_digits_cnn"]
    assert (tmp_path / "eval" / "nearest_ld_eval.png").is_file()


def test_bad_inputs_raise_named_errors(tmp_path, ckpt):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        sample(compose_named("sample", [f"ckpt={bad}"]))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        sample(compose_named("sample", [f"ckpt={truncated}"]))
    with pytest.raises(CheckpointError, match="does not exist"):
        sample(compose_named("sample", [f"ckpt={tmp_path / 'missing.ckpt'}"]))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a lightning_diff checkpoint"):
        sample(compose_named("sample", [f"ckpt={foreign}"]))
    with pytest.raises(DataError, match="does not exist"):
        train(compose_train(["data=array", f"data.path={tmp_path / 'none.npy'}"], tmp_path / "r"))
    np.save(tmp_path / "3d.npy", np.zeros((10, 4, 4), dtype=np.float32))
    with pytest.raises(DataError):
        train(compose_train(["data=array", f"data.path={tmp_path / '3d.npy'}"], tmp_path / "r"))
    with pytest.raises(ConfigError, match="resume="):
        train(compose_train(["data=moons", f"resume={tmp_path / 'nope.ckpt'}"], tmp_path / "r"))
    cfg = compose_named("eval", [])
    with open_dict(cfg), pytest.raises(ConfigError, match="exactly one"):
        evaluate(cfg)


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_reports_user_errors_in_one_line(tmp_path):
    """Through the real entry points: a missing data file and a corrupt checkpoint print one line."""
    missing = run_cli(
        "lightning_diff.cli.train", "data=array", f"data.path={tmp_path / 'x.npy'}", f"run_dir={tmp_path}/r"
    )
    assert missing.returncode == 2
    lines = [ln for ln in missing.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "x.npy" in lines[0] and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    corrupt = run_cli("lightning_diff.cli.sample", f"ckpt={bad}")
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr
    assert [ln for ln in corrupt.stderr.splitlines() if ln.startswith("error:")][0].count("corrupt") == 1


@pytest.mark.ddp
def test_a_spawned_process_user_error_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    """Under ``trainer=ddp_cpu`` (ddp_spawn) the error is raised in a spawned process and comes back as
    the text of its traceback: a user error still prints as its one line."""
    from torch.multiprocessing import ProcessRaisedException

    from lightning_diff.cli import user_error
    from lightning_diff.errors import CheckpointError

    done = run_cli(
        "lightning_diff.cli.train",
        "data=moons",
        "trainer=ddp_cpu",
        "callbacks.evaluation.num_samples=1",
        f"run_dir={tmp_path}/r",
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [
        "error: callbacks.evaluation.num_samples=1 is too few on 2 process(es): give 2 or more "
        "(two for the Frechet distance, one per process)"
    ]
    text = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n'
    rebuilt = user_error(ProcessRaisedException(text + "lightning_diff.errors.CheckpointError: a: b", 1, 1))
    assert type(rebuilt) is CheckpointError and str(rebuilt) == "a: b"
    nan = user_error(ProcessRaisedException(text + "FloatingPointError: train/loss is nan", 1, 1))
    assert type(nan) is FloatingPointError and str(nan) == "train/loss is nan"
    for bug in ("ValueError: a bug", "lightning_diff.errors.NotAnError: x", "other.ConfigError: x"):
        assert user_error(ProcessRaisedException(text + bug, 1, 1)) is None, bug


def test_cli_unknown_config_key_names_the_key_and_the_fix(tmp_path):
    result = run_cli("lightning_diff.cli.train", "no_such_key=1", f"run_dir={tmp_path}/r")
    assert result.returncode != 0
    assert "no_such_key" in result.stderr and "+no_such_key" in result.stderr


@pytest.mark.parametrize(
    "sampler", ["ddim", "ancestral", "euler_maruyama", "exponential", "pc", "heun", "ode"]
)
def test_sample_with_every_sampler(ckpt, tmp_path, sampler):
    """Every sampler draws from a DDPM checkpoint through ld-sample (cross-family by design)."""
    overrides = [
        f"ckpt={ckpt}",
        "num_samples=3",
        f"out={tmp_path / 's.npy'}",
        f"sampler={sampler}",
        "num_steps=4",
    ]
    array = sample(compose_named("sample", overrides))
    assert array.shape == (3, 1, 8, 8) and np.isfinite(array).all()


def test_reference_statistics_are_cached_and_reused(tmp_path, monkeypatch):
    from lightning_diff.data import DigitsDataModule
    from lightning_diff.metrics.frechet import FrechetDistance
    from lightning_diff.metrics.pipeline import build_suite

    dm = DigitsDataModule()
    first = build_suite(dm, kid=False, cache_dir=tmp_path)
    files = list((tmp_path / "reference").glob("digits-*-digits_cnn.pt"))
    assert len(files) == 1

    # A cache hit reads the file: computing the training statistics again would fail here.
    def no_recompute(self, x, real):
        if real:
            raise AssertionError("the reference statistics were recomputed despite the cache")
        return original(self, x, real)

    original = FrechetDistance.update
    with monkeypatch.context() as patch:
        patch.setattr(FrechetDistance, "update", no_recompute)
        second = build_suite(dm, kid=False, cache_dir=tmp_path)
    torch.testing.assert_close(second.frechet.ref_cov, first.frechet.ref_cov)
    # A different subset is a different key: no stale statistics.
    build_suite(DigitsDataModule(num_train=100), kid=False, cache_dir=tmp_path)
    assert len(list((tmp_path / "reference").glob("*.pt"))) == 2


def test_eval_logs_to_an_offline_wandb_run(ckpt, tmp_path):
    out = tmp_path / "m.json"
    overrides = [f"ckpt={ckpt}", "num_samples=8", f"out={out}", "wandb.enabled=true", "wandb.mode=offline"]
    metrics = evaluate(compose_named("eval", overrides))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("*.wandb")
    logged = history(log)
    key = next(k for k in metrics if k.endswith("_vs_heldout"))
    assert logged[f"eval/{key}"] == pytest.approx(metrics[key])  # the numbers ld-eval wrote, in the run
    assert logged["eval/samples"]["_type"] == "table-file" and logged["eval/samples"]["nrows"] == 8


def test_sample_exact_draws_a_closed_form_model_and_refuses_a_network(ckpt, gaussian_run, tmp_path):
    # model=gaussian on the digits: sampler=exact draws N(mean, cov) of the training set itself.
    out = tmp_path / "e.npy"
    overrides = [f"ckpt={gaussian_run[0]}", "num_samples=4000", f"out={out}"]
    array = sample(compose_named("sample", [*overrides, "sampler=exact", "num_steps=7"]))
    datamodule = instantiate(compose_train(["data=digits"], tmp_path / "d").data)
    datamodule.setup("fit")
    data = datamodule.train_tensor().reshape(-1, 64).double()
    flat = torch.from_numpy(array).reshape(-1, 64).double()
    assert (flat.mean(0) - data.mean(0)).abs().max() < 0.05  # standard error about 0.01 per pixel
    assert (torch.cov(flat.T) - torch.cov(data.T)).abs().max() < 0.06
    with pytest.raises(ConfigError, match="sampler=exact needs"):
        sample(compose_named("sample", [f"ckpt={ckpt}", "num_samples=2", f"out={out}", "sampler=exact"]))


def test_sample_with_philox_noise_follows_its_streams_on_any_batch_size(ckpt, tmp_path):
    """noise=philox: sample i is drawn from CounterNoise's streams for (seed, i), whatever the batch."""
    from lightning_diff.diffusion.random import CounterNoise

    common = [f"ckpt={ckpt}", "num_samples=6", "sampler=ancestral", "num_steps=3", "seed=7"]
    philox = [
        sample(
            compose_named("sample", [*common, "noise=philox", f"batch_size={b}", f"out={tmp_path / 'p.npy'}"])
        )
        for b in (4, 6)
    ]
    np.testing.assert_allclose(philox[0], philox[1], rtol=1e-5, atol=1e-6)  # the network's batch numerics
    model, _ = load_model(ckpt, torch.device("cpu"))
    sampler = Sampler(sample_ancestral, 3)
    direct, _ = model.sample(
        6, (1, 8, 8), sampler=sampler, generator=CounterNoise(range(6), seed=7), use_ema=True
    )
    np.testing.assert_array_equal(philox[1], direct.numpy())
    generators = sample(compose_named("sample", [*common, f"out={tmp_path / 'g.npy'}"]))
    assert np.abs(generators - philox[0]).min() > 0  # another stream: no sample in common
    with pytest.raises(ConfigError, match="noise="):
        sample(compose_named("sample", [*common, "noise=xorshift", f"out={tmp_path / 'x.npy'}"]))
