"""Performance switches: bf16 autocast, model.compile, model.channels_last, fused AdamW, loader options."""

from __future__ import annotations

import copy
import csv
import functools
import pickle

import lightning as L
import pytest
import torch
from conftest import compose_train, needs_gpu
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from lightning_diff.data import DigitsDataModule
from lightning_diff.diffusion import DiscreteSchedule
from lightning_diff.models import DDPM, ScoreSDE
from lightning_diff.models.diffusion_module import build_optimizer
from lightning_diff.models.ema import EMAUpdate, ExponentialAverage
from lightning_diff.nets import MLP, UNet

CUDA = torch.cuda.is_available()


def tiny_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(dim=2, hidden_dim=16, num_layers=2, emb_dim=16)


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(
        in_channels=3,
        resolution=8,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
    )


def fit(model, data: torch.Tensor, steps: int, accelerator: str = "cpu", **trainer_kwargs) -> L.Trainer:
    """``steps`` optimiser steps over ``data`` in fixed batches, nothing written to disk."""
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=False))
    return trainer


def vectors() -> torch.Tensor:
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(1))


def images() -> torch.Tensor:
    return torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def ddpm(net, **kwargs) -> DDPM:
    return DDPM(
        net, DiscreteSchedule(num_timesteps=100), sigma_data=0.5, ema_decay=0.9, ema_warmup=False, **kwargs
    )


def test_bf16_mixed_runs_the_net_in_bf16_on_cpu_and_keeps_fp32_weights():
    model = ddpm(tiny_mlp())
    seen = []
    model.net.input_proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    trainer = fit(model, vectors(), 2, precision="bf16-mixed")
    assert trainer.global_step == 2
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.fixture(params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def compile_backend(request, monkeypatch):
    """torch.compile with the given backend: ``aot_eager`` traces the forward and backward graphs like
    the default but skips code generation (seconds on a CPU); ``inductor``, the default, takes about a
    minute on one CPU core, so it is marked slow."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=request.param))
    return request.param


def test_compile_trains_with_the_same_keys_weights_and_ema_as_eager(tmp_path, compile_backend):
    eager, compiled = ddpm(tiny_mlp()), ddpm(tiny_mlp(), compile=True)
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    start = copy.deepcopy(compiled.ema.module.state_dict())
    fit(eager, vectors(), 2)
    trainer = fit(compiled, vectors(), 2)
    # The loss really went through torch.compile, and nothing about it reached the module tree.
    assert type(compiled.training_net).__name__ == "OptimizedModule"
    assert compiled.training_net._orig_mod is compiled.net
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # The EMA followed the (compiled-trained) weights.
    assert any(not torch.equal(start[n], v) for n, v in compiled.ema.module.state_dict().items())
    # A checkpoint of the compiled run loads into a plain model, and the module still pickles.
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    plain = ddpm(tiny_mlp())
    plain.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    torch.testing.assert_close(plain.net.state_dict(), compiled.net.state_dict())
    clone = pickle.loads(pickle.dumps(compiled))
    assert clone.__dict__["_training_net"] is None and clone.compile_net


def test_channels_last_converts_weights_ema_and_inputs_and_trains_like_contiguous():
    model = ddpm(tiny_unet(), channels_last=True)
    reference = ddpm(tiny_unet())
    cl = torch.channels_last
    assert model.net.mid[0].res.conv1.weight.is_contiguous(memory_format=cl)
    assert model.ema.module.mid[0].res.conv1.weight.is_contiguous(memory_format=cl)
    assert not reference.net.mid[0].res.conv1.weight.is_contiguous(memory_format=cl)
    assert model.state_dict().keys() == reference.state_dict().keys()
    formats = []
    model.net.conv_in.register_forward_pre_hook(
        lambda mod, args: formats.append(args[0].is_contiguous(memory_format=cl))
    )
    fit(model, images(), 2)
    fit(reference, images(), 2)
    assert formats and all(formats)
    for name, value in reference.net.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_leaves_vector_nets_alone():
    model = ScoreSDE(tiny_mlp(), sigma_data=0.5, channels_last=True)
    x = vectors()[:8]
    loss = model.loss(x, torch.Generator().manual_seed(0))
    expected = ScoreSDE(tiny_mlp(), sigma_data=0.5).loss(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, expected)


def test_fused_adamw_is_passed_through_and_falls_back_with_a_warning():
    model = ddpm(tiny_mlp(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, fused=True))
    opt = model.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    default = ddpm(tiny_mlp(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, fused=None))
    assert not default.configure_optimizers()["optimizer"].defaults["fused"]

    def no_fused_here(params, lr, fused=None):
        if fused:
            raise RuntimeError("fused=True requires all the params to be floating point Tensors of CUDA")
        return torch.optim.AdamW(params, lr=lr, fused=fused)

    params = list(tiny_mlp().parameters())
    with pytest.warns(UserWarning, match="fused=true is not supported"):
        opt = build_optimizer(functools.partial(no_fused_here, lr=1e-3, fused=True), params)
    assert not opt.defaults["fused"]
    with pytest.raises(RuntimeError, match="other"):
        build_optimizer(functools.partial(_raise_other, fused=False), params)


def _raise_other(params, fused=None):
    raise RuntimeError("some other failure")


@pytest.mark.parametrize("family", ["ddpm", "score_sde"])
def test_default_config_trains_with_fused_adamw(family):
    """``model.optimizer.fused`` defaults to true: one kernel per step, on the CPU too."""
    cfg = compose_train([f"model={family}", "data=moons"])
    assert cfg.model.optimizer.fused is True
    model = instantiate(cfg.model, net=instantiate(cfg.net, data_shape=(2,)))
    assert model.configure_optimizers()["optimizer"].defaults["fused"] is True


def test_switches_compose_from_the_command_line():
    cfg = compose_train(
        ["model.compile=true", "model.channels_last=true", "model.optimizer.fused=true", "data=digits"]
    )
    assert cfg.model.compile is True and cfg.model.optimizer.fused is True
    assert cfg.model.optimizer.foreach is None and cfg.data.pin_memory is None
    net = instantiate(cfg.net, data_shape=(1, 8, 8))
    model = instantiate(cfg.model, net=net)
    assert model.compile_net and model.channels_last
    assert model.configure_optimizers()["optimizer"].defaults["fused"] is True
    plain = instantiate(compose_train(["data=digits"]).model, net=instantiate(cfg.net, data_shape=(1, 8, 8)))
    assert not plain.compile_net and plain.training_net is plain.net


def test_loader_options_resolve_their_auto_defaults():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.pin_memory is CUDA and loader.persistent_workers is False and loader.num_workers == 0
    dm = DigitsDataModule(batch_size=32, num_workers=2)
    dm.setup("fit")
    assert dm.train_dataloader().persistent_workers is True and dm.val_dataloader().persistent_workers
    dm = DigitsDataModule(batch_size=32, num_workers=2, pin_memory=True, persistent_workers=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.pin_memory is True and loader.persistent_workers is False
    # Persistent workers without workers would make DataLoader raise; the option is then ignored.
    dm = DigitsDataModule(batch_size=32, persistent_workers=True)
    dm.setup("fit")
    assert dm.train_dataloader().persistent_workers is False


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fused_adamw_under_mixed_precision_clips_gradients_like_the_unfused_optimizer(precision):
    """Lightning's mixed-precision plugin refuses gradient clipping for fused AdamW; the module clips
    those gradients itself (after the loss scaler has unscaled them, in fp16): the same weights as
    unfused AdamW with the same clipping, and not those of an unclipped run (the clip value is small
    enough to bind at every step). fp16 runs on the CPU through a CPU GradScaler."""

    def trained(fused: bool, clip: float | None) -> dict[str, torch.Tensor]:
        model = ddpm(tiny_mlp(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, fused=fused))
        if precision == "16-mixed":
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
        else:
            kwargs = {"precision": precision}
        trainer = fit(model, vectors(), 4, gradient_clip_val=clip, **kwargs)
        assert trainer.global_step == 4
        assert trainer.optimizers[0].defaults["fused"] is fused
        return {k: v.clone() for k, v in model.net.state_dict().items()}

    fused, unfused, unclipped = trained(True, 1e-3), trained(False, 1e-3), trained(True, None)
    for key, value in fused.items():
        torch.testing.assert_close(value, unfused[key], rtol=1e-5, atol=1e-6)
    assert max((fused[k] - unclipped[k]).abs().max().item() for k in fused) > 1e-4


@pytest.mark.gpu
@needs_gpu  # fused AdamW, bf16 and compile on the device
def test_all_switches_together_on_a_gpu():
    model = ddpm(
        tiny_unet(),
        compile=True,
        channels_last=True,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, fused=True),
    )
    trainer = fit(model, images(), 3, accelerator="gpu", precision="bf16-mixed", gradient_clip_val=1.0)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.optimizers[0].defaults["fused"] is True


def test_cached_ema_update_matches_averaged_model_bit_for_bit():
    """The EMA with cached tensor lists gives AveragedModel's weights, also across a reload and a
    swapped buffer (the cache is rebuilt), and pickles without its cache."""
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    net = tiny_mlp()
    reference = AveragedModel(net, multi_avg_fn=EMAUpdate(0.9, True), use_buffers=True)
    fast = ExponentialAverage(net, EMAUpdate(0.9, True))
    for step in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        if step == 2:
            fast.load_state_dict(copy.deepcopy(fast.state_dict()))
        if step == 4:
            name, buf = next((n, b) for n, b in net.named_buffers())
            module = net.get_submodule(name.rpartition(".")[0])
            module._buffers[name.rpartition(".")[2]] = buf.clone() + 1
        reference.update_parameters(net)
        fast.update_parameters(net)
        for key, value in reference.state_dict().items():
            assert torch.equal(value, fast.state_dict()[key]), (step, key)
    assert int(fast.n_averaged) == 6
    assert pickle.loads(pickle.dumps(fast))._cache is None


def test_ema_follows_the_warmed_up_recursion_written_out():
    """Against the recursion by hand, in float64: the first update copies the weights, then
    e_k = d_k e_(k-1) + (1 - d_k) w_k with d_k = min(decay, (1 + n) / (10 + n)), n = k - 1 updates so far;
    without warm-up d_k = decay. Each run is also far from the other schedule's recursion."""

    def recursion(history, warmup):
        expected = history[0]
        for n, weights in enumerate(history[1:], start=1):
            d = min(0.95, (1 + n) / (10 + n)) if warmup else 0.95
            expected = [d * e + (1 - d) * w for e, w in zip(expected, weights, strict=True)]
        return torch.cat([e.reshape(-1) for e in expected])

    for warmup in (True, False):
        torch.manual_seed(1)
        net = tiny_mlp()
        ema = ExponentialAverage(net, EMAUpdate(0.95, warmup))
        history = []
        for _ in range(40):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p))
            ema.update_parameters(net)
            history.append([p.detach().double().clone() for p in net.parameters()])
        got = torch.cat([p.detach().double().reshape(-1) for p in ema.module.parameters()])
        torch.testing.assert_close(got, recursion(history, warmup), rtol=1e-5, atol=1e-5)
        assert (got - recursion(history, not warmup)).abs().max() > 0.1


def test_nan_loss_is_reported_with_its_first_step_before_any_checkpoint(tmp_path):
    """Losses are checked at logging steps and before checkpoints; the error names the first bad step."""
    model = ddpm(tiny_mlp())
    model.loss_monitor.unchecked = [
        (3, torch.tensor(1.0)),
        (4, torch.tensor(float("inf"))),
        (5, torch.tensor(0.5)),
    ]
    with pytest.raises(FloatingPointError, match=r"^train/loss is inf at step 4: lower model.optimizer.lr"):
        model.check_finite_loss()
    assert model.loss_monitor.unchecked == []
    model.check_finite_loss()  # nothing pending: nothing to raise


class _FlushProbe(L.Callback):
    """Logs a constant at every batch: the steps where it reaches the logger are the ones where
    Lightning hands metrics to the loggers."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("probe", 1.0)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_loss_reaches_the_logger_at_every_step_lightning_logs(tmp_path, accumulate):
    """train/loss is logged only at logging steps (no device sync in between), decided from public
    trainer attributes; a wrong rule leaves rows without it. 64 points in batches of 16: 4 batches
    an epoch, so 11 steps also cross epoch ends."""
    model = ddpm(tiny_mlp())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=11,
        logger=CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=3,
        accumulate_grad_batches=accumulate,
        callbacks=[_FlushProbe()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(vectors(), batch_size=16, shuffle=False))
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    flushed = {r["step"] for r in rows if r.get("probe")}
    with_loss = {r["step"] for r in rows if r.get("train/loss")}
    assert len(flushed) >= 3 and with_loss == flushed
    assert {r["step"] for r in rows if r.get("train/lr")} == flushed
    # At the end, callback metrics hold the last step's loss.
    assert trainer.global_step == 11 and torch.isfinite(trainer.callback_metrics["train/loss"])
