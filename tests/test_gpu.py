"""Paths that only a CUDA device exercises (tensors made on the CPU meeting tensors on the GPU).

Skipped without a GPU; `bash bench/gpu.sh` runs them (`pytest -m gpu`) with the GPU benchmarks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train, needs_gpu, small_unet
from hydra.utils import instantiate

from lightning_diff.metrics.pipeline import build_suite

pytestmark = [
    pytest.mark.gpu,
    needs_gpu,
]


@pytest.mark.parametrize("data", ["digits", "moons"])
def test_evaluation_suite_on_the_gpu_matches_the_cpu(data):
    """Every metric of the evaluation callback, its real-data baselines included, on CUDA: the same
    values as on the CPU (float32 feature sums differ in the last digits)."""
    dm = instantiate(compose_train([f"data={data}"]).data)
    dm.setup("fit")
    samples = dm.val_tensor()[:128].float() + 0.05 * torch.randn(128, *dm.data_shape)
    values = {}
    for device in ("cpu", "cuda"):
        suite = build_suite(dm, kid=True).to(device)
        suite.reset()
        suite.update(samples.to(device))
        values[device] = {**suite.compute(), **suite.baselines(128)}
    assert values["cpu"].keys() == values["cuda"].keys()
    for key, value in values["cpu"].items():
        assert values["cuda"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


def test_ddim_and_ancestral_loops_never_wait_for_the_gpu():
    """Given the grid on the CPU, the DDIM and ancestral loops launch every step without a device
    synchronisation (torch's sync debug mode raises on any); DDIM gives the CPU's samples."""
    from lightning_diff.diffusion import DiscreteSchedule, VPDenoiser
    from lightning_diff.diffusion.samplers import sample_ancestral, sample_ddim
    from lightning_diff.nets import MLP

    torch.manual_seed(0)
    schedule = DiscreteSchedule()
    denoiser = VPDenoiser(MLP(dim=2, hidden_dim=32, num_layers=2, emb_dim=16), schedule, "eps").eval()
    sigmas = schedule.sampling_sigmas(10, "leading")
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    expected, _ = sample_ddim(denoiser, x, sigmas)
    denoiser.cuda()
    x = x.cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ddim, _ = sample_ddim(denoiser, x, sigmas)
        ancestral, _ = sample_ancestral(denoiser, x, sigmas, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(ddim.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert ancestral.shape == x.shape and bool(torch.isfinite(ancestral).all())


def test_stop_and_resume_on_the_gpu_is_bit_exact(tmp_path):
    """The CPU resume test's run on CUDA with ``trainer.deterministic=true``: stopped at step 5 and
    resumed to 12, the checkpoint equals an uninterrupted run's bit for bit."""
    from test_resume import EXACT, _assert_same_state, _train_losses

    from lightning_diff.checkpoints import read_checkpoint
    from lightning_diff.cli.train import train

    gpu = EXACT + ["trainer.accelerator=gpu", "trainer.devices=1"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(compose_train(gpu + ["trainer.max_steps=12"], straight))
    train(compose_train(gpu + ["trainer.max_steps=5"], stopped))
    train(compose_train(gpu + ["trainer.max_steps=12", "resume=auto"], stopped))
    a = read_checkpoint(straight / "checkpoints" / "last.ckpt")
    b = read_checkpoint(stopped / "checkpoints" / "last.ckpt")
    _assert_same_state(a, b)
    assert _train_losses(straight) == _train_losses(stopped)


def _unet_grads(channels_last: bool, compiled: bool) -> dict[str, torch.Tensor]:
    from lightning_diff.diffusion import DiscreteSchedule
    from lightning_diff.models import DDPM

    net = small_unet(in_channels=3, resolution=16, base_channels=32)
    model = DDPM(
        net, DiscreteSchedule(), sigma_data=0.5, compile=compiled, channels_last=channels_last
    ).cuda()
    data = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)).cuda() * 2 - 1
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(data, torch.Generator(device="cuda").manual_seed(0)).mean()
    loss.backward()
    return {name: p.grad.float().contiguous() for name, p in model.net.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_channels_last_gradients_equal_contiguous_ones_under_bf16(compiled):
    """GroupNorm and convolutions in channels_last have had silent gradient bugs: every parameter's
    gradient (bf16 autocast, eager or compiled) within bf16 tolerance of the contiguous run's."""
    reference = _unet_grads(channels_last=False, compiled=compiled)
    other = _unet_grads(channels_last=True, compiled=compiled)
    for name, grad in reference.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (other[name] - grad).abs().max() <= 0.03 * scale, name


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_ddim_on_the_gpu_matches_the_eager_loop(mode):
    """sampler.compile on CUDA (``reduce-overhead`` replays each step's network call as a CUDA graph):
    two batches in a row (the second replays the graph) equal the eager loop's samples."""
    from lightning_diff.diffusion import DiscreteSchedule, Sampler, VPDenoiser, sample_ddim
    from lightning_diff.diffusion.random import SampleGenerators

    schedule = DiscreteSchedule().cuda()
    net = small_unet(in_channels=1, resolution=8, base_channels=32)
    denoiser = VPDenoiser(net, schedule, "eps").cuda().eval()
    eager, compiled = Sampler(sample_ddim, 10), Sampler(sample_ddim, 10, compile=mode)
    for seed in (0, 1):
        a, _ = eager(denoiser, schedule, (32, 1, 8, 8), SampleGenerators(range(32), seed=seed), "cuda")
        b, _ = compiled(denoiser, schedule, (32, 1, 8, 8), SampleGenerators(range(32), seed=seed), "cuda")
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
