"""Our DDIM loop against diffusers' DDIMScheduler loop with the same net, step count and noise.

    .venv/bin/python bench/sampler_vs_diffusers.py ckpt=runs/demo/checkpoints/last.ckpt steps=50
    .venv/bin/python bench/sampler_vs_diffusers.py num_samples=256 steps=50      # a fresh demo-size UNet
    .venv/bin/python bench/sampler_vs_diffusers.py net=cifar num_samples=256,1024 bf16=true \
        compile=false,default,reduce-overhead

Both loops start from the same Gaussian draw ``z`` (ours scales it by ``sqrt(1 + sigma_max^2)`` to the
variance-exploding convention) and call the same network ``steps`` times per sample (eta 0, leading
spacing, the DDPM linear schedule, no clipping). Reports samples/s, model evaluations per sample, the
ratio, and the largest difference between the two outputs (the loops compute the same update). The
network is the checkpoint's EMA net, or without ``ckpt`` the demo's UNet (random weights: speed does
not depend on training; ``net=cifar``: the 35.7M CIFAR-10 UNet of ``bench/unet_throughput.py`` at 32x32).
diffusers is a test-only dependency (``pip install -e .[dev]``).

``num_samples`` and ``compile`` take lists: every batch size, and our loop once per ``compile`` mode
(``sampler.compile``: the denoiser call of each step through ``torch.compile``, ``reduce-overhead``
replaying it as a CUDA graph); ``bf16=true`` runs both loops under bfloat16 autocast.

Teleportation saves model evaluations on top of either loop: see ``bench/teleport.py``.
"""

from __future__ import annotations

import sys

import torch
from common import machine_line, median, parse_args, table, timed

from lightning_diff.diffusion import DiscreteSchedule, VPDenoiser, sample_ddim
from lightning_diff.diffusion.compiled import CompiledDenoiser, compile_mode

DEFAULTS = {
    "ckpt": "",
    "net": "demo",
    "num_samples": [256],
    "compile": ["false"],
    "bf16": False,
    "steps": 50,
    "repeats": 3,
    "threads": 0,
}


def load_net(ckpt: str, device: str, kind: str = "demo"):
    if ckpt:
        from lightning_diff.checkpoints import load_model

        model, _ = load_model(ckpt, device)
        return model.ema.module.eval(), tuple(model.run_meta["data_shape"]), model.schedule
    from lightning_diff.nets import UNet

    if kind == "cifar":
        from unet_throughput import cifar_unet

        return cifar_unet(32).to(device).eval(), (3, 32, 32), DiscreteSchedule().to(device)
    if kind != "demo":
        sys.exit(f"error: net={kind!r} is not one of demo, cifar")
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
    net, shape, schedule = load_net(args["ckpt"], device, args["net"])
    counting = CountingNet(net)
    steps = args["steps"]
    sigmas = schedule.sampling_sigmas(steps, "leading").to(device)
    scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.cpu().double().numpy(),  # the very betas of our schedule
        clip_sample=False,
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(steps)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args["bf16"])
    modes = [compile_mode(m, "compile") for m in args["compile"]]
    source = (
        args["ckpt"]
        or {"demo": "the demo UNet, random init", "cifar": "the 35.7M CIFAR UNet, random init"}[args["net"]]
    )
    print(f"{machine_line()}; samples of shape {shape}; net from {source}; bf16 autocast {args['bf16']}\n")
    rows = []
    for n in args["num_samples"]:
        z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0)).to(device)
        out: dict[str, torch.Tensor] = {}

        @torch.no_grad()
        def theirs(z=z, n=n, out=out) -> None:
            x = z.clone()
            with autocast:
                for t in scheduler.timesteps:
                    eps = counting(x, t.to(device).float().expand(n))
                    x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
            out["diffusers"] = x

        loops = [("diffusers DDIMScheduler", theirs, None)]
        for mode in modes:
            denoiser = VPDenoiser(net, schedule, "eps")
            call = CompiledDenoiser(denoiser, mode) if mode else denoiser

            @torch.no_grad()
            def ours(z=z, call=call, key=f"ours {mode}", out=out) -> None:
                x = z * (1 + sigmas[0] ** 2).sqrt().to(z.dtype)
                with autocast:
                    x, out[f"{key} nfe"] = sample_ddim(call, x, sigmas)
                out[key] = x.float()

            loops.append((f"lightning_diff sample_ddim, compile={mode or 'false'}", ours, f"ours {mode}"))
        base = None
        for name, fn, key in loops:
            fn()  # warm-up (and compilation)
            if key is not None:
                fn()  # CUDA graphs are recorded on the second call
            counting.calls = 0
            seconds = median([timed(fn) for _ in range(args["repeats"])])
            nfe = counting.calls // args["repeats"] if key is None else out[f"{key} nfe"]
            base = base or seconds
            diff = "" if key is None else f"{(out[key] - out['diffusers']).abs().max().item():.2e}"
            rows.append(
                [name, n, steps, nfe, f"{seconds:.3f}", f"{n / seconds:.1f}", f"{base / seconds:.3f}", diff]
            )
            print("  ".join(map(str, rows[-1])), flush=True)
    header = [
        "loop",
        "batch",
        "steps",
        "NFE / sample",
        "seconds",
        "samples/s",
        "speed vs diffusers",
        "max |diff|",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
