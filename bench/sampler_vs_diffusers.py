"""Our DDIM loop against diffusers' DDIMScheduler loop with the same net, step count and noise.

    .venv/bin/python bench/sampler_vs_diffusers.py ckpt=runs/demo/checkpoints/last.ckpt steps=50
    .venv/bin/python bench/sampler_vs_diffusers.py num_samples=256 steps=50      # a fresh demo-size UNet

Both loops start from the same Gaussian draw ``z`` (ours scales it by ``sqrt(1 + sigma_max^2)`` to the
variance-exploding convention) and call the same network ``steps`` times per sample (eta 0, leading
spacing, the DDPM linear schedule, no clipping). Reports samples/s, model evaluations per sample, the
ratio, and the largest difference between the two outputs (the loops compute the same update). The
network is the checkpoint's EMA net, or without ``ckpt`` the demo's UNet (random weights: speed does
not depend on training). diffusers is a test-only dependency (``pip install -e .[dev]``).

Teleportation saves model evaluations on top of either loop: see ``bench/teleport.py``.
"""

from __future__ import annotations

import sys

import torch
from common import machine_line, median, parse_args, table, timed

from lightning_diff.diffusion import DiscreteSchedule, VPDenoiser, sample_ddim

DEFAULTS = {"ckpt": "", "num_samples": 256, "steps": 50, "repeats": 3, "threads": 0}


def load_net(ckpt: str, device: str):
    if ckpt:
        from lightning_diff.checkpoints import load_model

        model, _ = load_model(ckpt, device)
        return model.ema.module.eval(), tuple(model.run_meta["data_shape"]), model.schedule
    from lightning_diff.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        resolution=8,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
    )
    return net.to(device).eval(), (1, 8, 8), DiscreteSchedule().to(device)


class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        sys.exit("error: diffusers is not installed: pip install -e '.[dev]' (it is a test dependency)")
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, shape, schedule = load_net(args["ckpt"], device)
    counting = CountingNet(net)
    n, steps = args["num_samples"], args["steps"]
    z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    sigmas = schedule.sampling_sigmas(steps, "leading").to(device)
    denoiser = VPDenoiser(counting, schedule, "eps")
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.cpu().double().numpy(),  # the very betas of our schedule
        clip_sample=False,
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(steps)
    out: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def ours() -> None:
        x = z * (1 + sigmas[0] ** 2).sqrt().to(z.dtype)
        out["ours"] = sample_ddim(denoiser, x, sigmas)[0]

    @torch.no_grad()
    def theirs() -> None:
        x = z.clone()
        for t in scheduler.timesteps:
            eps = counting(x, t.to(device).float().expand(n))
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out["diffusers"] = x

    rows, seconds = [], {}
    for name, fn in (("lightning_diff sample_ddim", ours), ("diffusers DDIMScheduler", theirs)):
        fn()  # warm-up
        counting.calls = 0
        times = [timed(fn) for _ in range(args["repeats"])]
        nfe = counting.calls // args["repeats"]
        seconds[name] = median(times)
        rows.append([name, steps, nfe, f"{seconds[name]:.3f}", f"{n / seconds[name]:.1f}"])
    ratio = seconds["diffusers DDIMScheduler"] / seconds["lightning_diff sample_ddim"]
    diff = (out["ours"] - out["diffusers"]).abs().max().item()
    source = args["ckpt"] or "the demo UNet, random init"
    print(f"{machine_line()}; {n} samples of shape {shape}; net from {source}\n")
    print(table(["loop", "steps", "NFE / sample", "seconds", "samples/s"], rows))
    print(f"\nspeed ratio ours / diffusers (samples/s): {ratio:.3f}")
    print(f"largest |difference| between the two loops' outputs: {diff:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
