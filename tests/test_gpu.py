"""Paths that only a CUDA device exercises (tensors made on the CPU meeting tensors on the GPU).

Skipped without a GPU; `bash bench/gpu.sh` runs them (`pytest -m gpu`) with the GPU benchmarks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate

from lightning_diff.metrics.pipeline import build_suite

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
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
