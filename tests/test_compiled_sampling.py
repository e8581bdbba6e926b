"""``sampler.compile`` and ``model.compile`` modes: compiled sampling draws what eager sampling draws,
every mode reaches ``torch.compile``, the CUDA-graph modes start a graph step and copy each output,
and a bad value is one line."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
from conftest import small_unet
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_diff.cli import CONF_DIR
from lightning_diff.diffusion import DiscreteSchedule, Sampler, VPDenoiser, sample_ddim
from lightning_diff.diffusion.compiled import CompiledDenoiser, compile_mode
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.errors import ConfigError
from lightning_diff.models import DDPM
from lightning_diff.nets import MLP

SAMPLERS = ("ddim", "heun", "ancestral", "teleport_ddim")


def conf_sampler(name: str, **overrides):
    cfg = OmegaConf.load(f"{CONF_DIR}/sampler/{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return instantiate(cfg)


@pytest.fixture(params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def compile_calls(request, monkeypatch):
    """torch.compile with the given backend, recording the mode each call asked for (``aot_eager``
    traces like the default backend without generating code: seconds on a CPU)."""
    calls: list[str | None] = []
    real = torch.compile

    def recording(module, **kwargs):
        calls.append(kwargs.get("mode"))
        return real(module, backend=request.param)

    monkeypatch.setattr(torch, "compile", recording)
    return calls


def tiny_ddpm(images: bool) -> DDPM:
    if images:
        net = small_unet(in_channels=1, resolution=8, base_channels=8)
    else:
        torch.manual_seed(0)
        net = MLP(dim=2, hidden_dim=16, num_layers=2, emb_dim=16)
    return DDPM(net, DiscreteSchedule(num_timesteps=100), sigma_data=0.5, ema_decay=0.0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_compiled_sampler_draws_what_the_eager_one_draws(name, compile_calls):
    schedule = DiscreteSchedule(num_timesteps=100)
    torch.manual_seed(0)
    net = MLP(dim=2, hidden_dim=16, num_layers=2, emb_dim=16).eval()
    denoiser = VPDenoiser(net, schedule)
    reference = None
    if name.startswith("teleport"):
        from lightning_diff.diffusion.denoisers import GaussianDenoiser

        reference = GaussianDenoiser(torch.zeros(2), torch.eye(2) * 0.5)
    eager = conf_sampler(name, num_steps=6)
    # teleportation's compile switch is its inner sampler's
    switch = "sampler.compile" if name.startswith("teleport") else "compile"
    compiled = conf_sampler(name, num_steps=6, **{switch: True})
    assert compiled.compile == "default" and eager.compile is None
    kwargs = {"reference": reference} if reference is not None else {}
    x_eager, nfe_eager = eager(denoiser, schedule, (12, 2), SampleGenerators(range(12), seed=3), **kwargs)
    x_comp, nfe_comp = compiled(denoiser, schedule, (12, 2), SampleGenerators(range(12), seed=3), **kwargs)
    assert compile_calls == [None]  # one compilation, in the default mode
    wrapper = compiled.prepare(denoiser)
    assert isinstance(wrapper, CompiledDenoiser) and type(wrapper.compiled).__name__ == "OptimizedModule"
    assert wrapper is compiled.prepare(denoiser)  # built once per denoiser
    assert nfe_comp == nfe_eager
    torch.testing.assert_close(x_comp, x_eager, rtol=1e-5, atol=1e-5)
    # per-sample noise streams: the first rows alone, compiled, are the same rows
    x_part, _ = compiled(denoiser, schedule, (5, 2), SampleGenerators(range(5), seed=3), **kwargs)
    torch.testing.assert_close(x_part, x_comp[:5], rtol=1e-5, atol=1e-5)


def test_a_model_samples_through_a_compiled_sampler_and_still_pickles(compile_calls):
    model = tiny_ddpm(images=True)
    plain = Sampler(sample_ddim, num_steps=4)
    compiled = Sampler(sample_ddim, num_steps=4, compile="default")
    gens = SampleGenerators(range(6), seed=0)
    x_plain, _ = model.sample(6, (1, 8, 8), plain, gens, use_ema=False)
    x_comp, _ = model.sample(6, (1, 8, 8), compiled, SampleGenerators(range(6), seed=0), use_ema=False)
    torch.testing.assert_close(x_comp, x_plain, rtol=1e-4, atol=1e-5)
    model.sampler = compiled
    clone = pickle.loads(pickle.dumps(model))
    assert clone.sampler.compile == "default" and len(clone.sampler._compiled) == 0
    x_clone, _ = clone.sample(6, (1, 8, 8), None, SampleGenerators(range(6), seed=0), use_ema=False)
    torch.testing.assert_close(x_clone, x_comp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_start_a_graph_step_and_copy_each_output(mode, monkeypatch):
    """CPU stand-in for the CUDA-graph path: ``torch.compile`` recorded (and left out), so what is
    checked is the wrapper's contract: the mode reaches torch.compile, every call begins a graph
    step, and no output shares memory with the graph's own (which the next replay overwrites)."""
    modes, steps, outputs = [], [], []

    def fake_compile(module, **kwargs):
        modes.append(kwargs.get("mode"))

        def call(x, sigma):
            out = module(x, sigma)
            outputs.append(out)
            return out

        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    schedule = DiscreteSchedule(num_timesteps=100)
    torch.manual_seed(0)
    denoiser = VPDenoiser(MLP(dim=2, hidden_dim=16, num_layers=2, emb_dim=16).eval(), schedule)
    sampler = Sampler(sample_ddim, num_steps=5, compile=mode)
    x, nfe = sampler(denoiser, schedule, (4, 2), SampleGenerators(range(4), seed=0))
    assert modes == [mode] and len(steps) == nfe == 5 and len(outputs) == 5
    assert all(out.data_ptr() != x.data_ptr() for out in outputs)
    eager, _ = Sampler(sample_ddim, num_steps=5)(
        denoiser, schedule, (4, 2), SampleGenerators(range(4), seed=0)
    )
    torch.testing.assert_close(x, eager)


def test_model_compile_modes_reach_torch_compile(monkeypatch):
    modes = []

    def fake_compile(module, **kwargs):
        modes.append(kwargs.get("mode"))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    for value, expected in [(True, None), ("default", None), ("max-autotune", "max-autotune")]:
        torch.manual_seed(0)
        model = DDPM(
            MLP(dim=2, hidden_dim=8, num_layers=1, emb_dim=8),
            DiscreteSchedule(num_timesteps=100),
            compile=value,
        )
        assert model.training_net is model.net  # the fake compile returns the module itself
        assert modes[-1] == expected
    model = DDPM(
        MLP(dim=2, hidden_dim=8, num_layers=1, emb_dim=8), DiscreteSchedule(num_timesteps=100), compile=False
    )
    modes.clear()
    assert model.training_net is model.net and modes == []


@pytest.mark.parametrize("where", ["sampler", "model"])
def test_an_unknown_compile_mode_is_one_line(where):
    if where == "sampler":
        # Hydra wraps it; the entry points print the cause, this one line
        with pytest.raises(InstantiationException) as info:
            conf_sampler("ddim", compile="fast")
        assert isinstance(info.value.__cause__, ConfigError)
        assert str(info.value.__cause__).startswith(
            "sampler.compile='fast' is not one of false, true, default"
        )
    else:
        with pytest.raises(ConfigError, match=r"^model.compile='fast' is not one of"):
            DDPM(
                MLP(dim=2, hidden_dim=8, num_layers=1, emb_dim=8),
                DiscreteSchedule(num_timesteps=100),
                compile="fast",
            )


def test_compile_switch_values():
    values = (False, None, "false", True, "true")
    assert [compile_mode(v, "k") for v in values] == [None, None, None, "default", "default"]
    assert compile_mode("Reduce-Overhead", "k") == "reduce-overhead"
    with pytest.raises(ConfigError):
        compile_mode(3, "k")


def test_with_num_steps_keeps_the_compile_mode():
    sampler = Sampler(functools.partial(sample_ddim, eta=0.0), num_steps=5, compile="reduce-overhead")
    assert sampler.with_num_steps(9).compile == "reduce-overhead"
    assert sampler.with_num_steps(9).num_steps == 9
