"""Short training runs per data kind, the run directory's contents, reproducibility and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import LEARN_GMM, compose_train, gaussian_adversary_ratio
from lightning.pytorch.loggers import WandbLogger

from lightning_diff.checkpoints import read_checkpoint
from lightning_diff.cli.train import train


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    metrics, objects = train(compose_train(["experiment=digits_ddpm", "logger=csv"], run_dir))
    return run_dir, metrics, objects


def test_digits_run_directory_has_everything(digits_run):
    run_dir, metrics, objects = digits_run
    assert objects["trainer"].global_step == 6
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["run_dir"] == str(run_dir) and cfg["model"]["_target_"] == "lightning_diff.models.DDPM"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt"]
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["step_0000003.png", "step_0000006.png"]
    log = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert {"train/loss", "val/loss", "eval/sliced_wasserstein"} <= set(log[0].split(","))
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["step"] == 6 and saved["num_samples"] == 32
    assert saved["eval/nfe"] == 9  # the default Heun sampler: 2 K - 1 evaluations for K = 5 steps
    for key in (
        "eval/fd_digits_cnn",
        "eval/fd_digits_cnn_heldout",
        "eval/kid_digits_cnn_mean",
        "eval/ratio_mean",
        "eval/fd_digits_cnn_vs_heldout",
        "eval/fd_digits_cnn_vs_heldout_floor",
        "eval/kid_digits_cnn_vs_heldout",
        "eval/nn1_ratio_to_heldout",
        "eval/recall_digits_cnn",
    ):
        assert np.isfinite(saved[key]), key
    assert saved["eval/heldout_compared"] == 32  # the 32 samples against 32 of the held-out digits
    assert "eval/data_copying_ct" in saved  # NaN here: no cell holds 20 of 32 samples
    figures = sorted(p.name for p in (run_dir / "eval").iterdir())
    expected = [
        "data_copying_cells_step_0000006.png",
        "nearest_step_0000006.png",
        "nn_histograms_step_0000006.png",
    ]
    assert figures == expected
    assert np.isfinite(metrics["train/loss"])


def test_checkpoint_holds_raw_and_ema_weights_and_config(digits_run):
    run_dir, _, objects = digits_run
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("net.") for k in keys) and any(k.startswith("ema.module.") for k in keys)
    model = objects["model"]
    for name, value in model.ema.module.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][f"ema.module.{name}"], value)
    # EMA differs from the raw weights after training (decay < 1), and the config travels along.
    assert any(
        not torch.equal(ckpt["state_dict"][f"net.{n}"], ckpt["state_dict"][f"ema.module.{n}"])
        for n in model.net.state_dict()
    )
    meta = ckpt["lightning_diff"]
    assert meta["data_shape"] == [1, 8, 8] and meta["config"]["name"] == "digits_ddpm"


@pytest.mark.parametrize(
    "overrides",
    [
        ["data=moons"],
        ["data=gaussian", "data.distribution.dim=5", "model.prediction=v", "model.loss_weighting=min_snr"],
        ["data=circle", "data.distribution.dim=4", "model.prediction=x0", "model.schedule.kind=cosine"],
        ["data=digits", "sampler=ancestral", "sampler.num_steps=4"],
    ],
    ids=["moons", "gaussian5d_v_minsnr", "circle4d_x0_cosine", "digits_ancestral"],
)
def test_short_training_run_per_data_kind(tmp_path, overrides):
    metrics, objects = train(compose_train(overrides + ["trainer.max_steps=4"], tmp_path / "run"))
    assert objects["trainer"].global_step == 4
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["eval/sliced_wasserstein"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("kind", ["vectors", "uint8_images", "float_images"])
def test_user_array_file_trains_with_the_net_that_fits(tmp_path, kind):
    rng = np.random.default_rng(0)
    array = {
        "vectors": rng.normal(size=(200, 3)).astype(np.float32),
        "uint8_images": rng.integers(0, 256, size=(64, 3, 8, 8), dtype=np.uint8),
        "float_images": rng.uniform(-1, 1, size=(64, 1, 8, 8)).astype(np.float32),
    }[kind]
    np.save(tmp_path / "data.npy", array)
    overrides = [
        "data=array",
        f"data.path={tmp_path / 'data.npy'}",
        "data.batch_size=16",
        "trainer.max_steps=3",
    ]
    _, objects = train(compose_train(overrides, tmp_path / "run"))
    net = objects["model"].net
    assert type(net).__name__ == ("MLP" if kind == "vectors" else "UNet")


def test_same_seed_same_weights(tmp_path):
    def weights(i):
        _, objects = train(
            compose_train(["data=moons", "trainer.max_steps=3", "logger=none"], tmp_path / str(i))
        )
        return objects["model"].state_dict()

    a, b = weights(0), weights(1)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_continues_step_counter_and_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    base = ["data=moons", "logger=wandb", "logger.wandb.mode=offline", "callbacks.evaluation.num_samples=8"]
    _, first = train(compose_train(base + ["trainer.max_steps=3"], run_dir))
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert first["trainer"].global_step == 3
    _, second = train(compose_train(base + ["trainer.max_steps=6", "resume=auto"], run_dir))
    assert second["trainer"].global_step == 6
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    wandb_logger = next(lg for lg in second["trainer"].loggers if isinstance(lg, WandbLogger))
    assert wandb_logger.version == run_id
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6
    # The offline wandb run was written under the run directory.
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def test_resume_auto_in_an_empty_run_dir_starts_fresh(tmp_path):
    _, objects = train(compose_train(["data=moons", "trainer.max_steps=2", "resume=auto"], tmp_path / "run"))
    assert objects["trainer"].global_step == 2


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    """A huge learning rate blows the weights up after the first step; the step-1 checkpoint survives."""
    overrides = [
        "data=moons",
        "model.optimizer.lr=1e30",
        "model.lr_warmup_steps=0",
        "trainer.gradient_clip_val=null",
        "callbacks.checkpoint.every_n_train_steps=1",
    ]
    with pytest.raises(FloatingPointError, match="train/loss is .* at step 1: lower model.optimizer.lr"):
        train(compose_train(overrides, tmp_path / "run"))
    folder = tmp_path / "run" / "checkpoints"
    # The first step's weights are saved; the step whose loss blew up wrote nothing.
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step0000001.ckpt"]
    ckpt = read_checkpoint(folder / "last.ckpt")
    assert ckpt["global_step"] == 1
    tensors = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert tensors and all(bool(torch.isfinite(v).all()) for v in tensors)


@pytest.mark.parametrize(
    ("callback", "error"),
    [
        ("lightning_diff.callbacks.evaluation.SampleEvaluation", "user"),
        ("lightning_diff.callbacks.sample_grid.SampleGrid", "user"),
        ("lightning_diff.callbacks.evaluation.SampleEvaluation", "bug"),
    ],
    ids=["evaluation-user_error", "sample_grid-user_error", "evaluation-bug"],
)
def test_a_failed_end_of_training_pass_keeps_the_final_checkpoint(tmp_path, monkeypatch, callback, error):
    """The end-of-training evaluation runs before Lightning's checkpoint callbacks end training. When it
    fails, last.ckpt still gets the final step's weights, and the error names that checkpoint (a user
    error as one line, anything else with its own traceback)."""
    import importlib
    import logging

    from lightning_diff.errors import ConfigError, EndOfTrainingError

    module, _, name = callback.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    failure = ConfigError("the option is wrong: fix the option") if error == "user" else RuntimeError("a bug")

    def run(self, trainer, pl_module):
        if trainer.global_step == 5:  # the end of training: the periodic runs at step 3 pass
            raise failure
        return original(self, trainer, pl_module)

    original = cls.run
    monkeypatch.setattr(cls, "run", run)
    run_dir = tmp_path / "run"
    overrides = ["data=moons", "trainer.max_steps=5", "callbacks.sample_grid.every_n_steps=3"]
    last = run_dir / "checkpoints" / "last.ckpt"
    if error == "user":
        with pytest.raises(EndOfTrainingError) as info:
            train(compose_train(overrides, run_dir))
        message = str(info.value)
        assert "\n" not in message and message == (
            f"training reached step 5 and saved {last}, but {name} failed: the option is wrong: fix the "
            f"option; fix it and evaluate with ld-eval ckpt={last}"
        )
        assert info.value.__cause__ is failure
    else:
        logger = logging.getLogger("lightning_diff.callbacks.periodic")
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        try:
            with pytest.raises(RuntimeError, match="a bug"):
                train(compose_train(overrides, run_dir))
        finally:
            logger.removeHandler(handler)
        assert [r.getMessage() for r in records] == [
            f"training reached step 5 and saved {last}, but {name} failed at the end of training "
            "with the error below"
        ]
    # The step-3 periodic checkpoint and the final one, which holds step 5.
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step0000003.ckpt"]
    assert read_checkpoint(last)["global_step"] == 5


@pytest.mark.parametrize("devices", [1, 2])
def test_too_few_evaluation_samples_stop_before_training(tmp_path, devices):
    from lightning_diff.cli import user_error
    from lightning_diff.errors import ConfigError

    least = max(2, devices)
    overrides = ["data=moons", f"callbacks.evaluation.num_samples={least - 1}"]
    if devices == 2:
        overrides += ["trainer=ddp_cpu", "trainer.strategy=ddp_spawn"]
    with pytest.raises(Exception) as info:
        train(compose_train(overrides, tmp_path / "run"))
    # ddp_spawn hands a spawned process's error back as its traceback's text; the CLI rebuilds it.
    error = user_error(info.value)
    assert type(error) is ConfigError and (error is info.value) == (devices == 1)
    assert str(error) == (
        f"callbacks.evaluation.num_samples={least - 1} is too few on {devices} process(es): give {least} "
        "or more (two for the Frechet distance, one per process)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists(), "refused before any step"


def test_learning_rate_warms_up_linearly_in_the_steps_taken_and_in_the_log(tmp_path):
    """lr_k = lr * min(1, (k + 1) / W) for optimiser step k. Applied: with a constant gradient every
    Adam step moves each weight by exactly lr_k (its bias-corrected m / sqrt(v) is the gradient's sign),
    so the steps taken read the schedule off. Logged: train/lr in metrics.csv, step by step."""
    import csv

    from hydra.utils import instantiate

    lr, warmup = 1e-3, 4
    expected = [lr * min(1.0, (k + 1) / warmup) for k in range(7)]
    overrides = [
        "data=moons",
        f"model.lr_warmup_steps={warmup}",
        f"model.optimizer.lr={lr}",
        "trainer.max_steps=7",
    ]
    cfg = compose_train([*overrides, "trainer.log_every_n_steps=1"], tmp_path / "run")
    model = instantiate(cfg.model, net=torch.nn.Linear(3, 3))
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    weight = model.net.weight
    for k, lr_k in enumerate(expected):
        before = weight.detach().clone()
        weight.grad = torch.full_like(weight, 0.5)
        model.net.bias.grad = torch.full_like(model.net.bias, -2.0)
        optimizer.step()
        scheduler.step()
        step = (weight.detach() - before).abs()
        torch.testing.assert_close(step, torch.full_like(step, lr_k), rtol=1e-4, atol=0, msg=f"step {k}")
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").open()))
    logged = {int(r["step"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}
    assert sorted(logged) == list(range(7))
    assert [logged[k] for k in range(7)] == pytest.approx(expected, rel=1e-6)


def test_gradient_accumulation_draws_new_noise_for_every_micro_batch(tmp_path, monkeypatch):
    """With accumulate_grad_batches=3 each optimiser step's three micro-batches are seeded by
    (noise_seed, step, 0..2): distinct noise within a step, and the same seeds in a second run."""
    import lightning_diff.models.diffusion_module as module
    from lightning_diff.seeding import step_seed

    def run(name: str) -> list[tuple[int, int, int]]:
        seen = []

        def recording(seed, step, micro_batch=0):
            seen.append((step, micro_batch, step_seed(seed, step, micro_batch)))
            return step_seed(seed, step, micro_batch)

        with monkeypatch.context() as patch:
            patch.setattr(module, "step_seed", recording)
            train(
                compose_train(
                    ["data=moons", "trainer.max_steps=4", "+trainer.accumulate_grad_batches=3"],
                    tmp_path / name,
                )
            )
        return seen

    first = run("a")
    assert [(step, micro) for step, micro, _ in first] == [(s, m) for s in range(4) for m in range(3)]
    assert len({seed for *_, seed in first}) == 12  # no two micro-batches share their noise
    assert run("b") == first


@pytest.mark.parametrize("sampler", ["default", "ancestral"])
def test_short_ddpm_run_learns_the_modes(sampler, tmp_path):
    """The default family, 300 steps on the 8-Gaussian mixture (radius 4): samples through its own
    sampler (deterministic Heun) and through ancestral sampling are far closer to the data than the
    moment-matched Gaussian, which has learned no mode; and the training loss fell."""
    from hydra.utils import instantiate

    from lightning_diff.diffusion import Sampler, sample_ancestral
    from lightning_diff.diffusion.random import SampleGenerators
    from lightning_diff.models import DDPM

    # The default's step count (the tiny test settings use 5).
    cfg = compose_train([*LEARN_GMM, "sampler.num_steps=25"], tmp_path / "run")
    _, objects = train(cfg)
    model, data = objects["model"], objects["datamodule"].train_tensor()[:2000]
    assert isinstance(model, DDPM) and model.sampler.num_steps == 25
    untrained = instantiate(cfg.model, net=instantiate(cfg.net, data_shape=(2,)))
    untrained.fit_data(objects["datamodule"].train_tensor())
    before = untrained.loss(data, torch.Generator().manual_seed(1)).mean()
    assert model.loss(data, torch.Generator().manual_seed(1)).mean() < 0.95 * before

    chosen = None if sampler == "default" else Sampler(sample_ancestral, 100)
    samples, _ = model.sample(2000, (2,), chosen, SampleGenerators(range(2000), seed=2))
    assert gaussian_adversary_ratio(samples, data) < 0.6
    assert samples.abs().max() < 3 * data.abs().max()  # no far outliers from the deterministic sampler
