"""Training throughput of the CIFAR-10 DDPM UNet (35.7M parameters) under each performance switch.

    .venv/bin/python bench/unet_throughput.py batch=128 steps=50 peak_tflops=989     # H100, bf16 dense
    .venv/bin/python bench/unet_throughput.py batch=128,256,512 variants=all,all_max_autotune,all_cudagraphs
    .venv/bin/python bench/unet_throughput.py batch=2 steps=2 warmup=1 variants=fp32,bf16,channels_last,fused

The net is Ho et al.'s CIFAR-10 UNet (base_channels 128, channel_mult 1,2,2,2, two residual blocks
per resolution, attention at 16x16, dropout 0.1) inside a DDPM module; one step is the module's
``loss`` (forward), backward and an AdamW step. Variants:

* ``fp32``: the baseline; ``bf16``: ``torch.autocast`` to bfloat16 (what ``trainer.precision=bf16-mixed``
  does); ``compile``: ``model.compile=true``; ``channels_last``: ``model.channels_last=true``;
  ``fused``: ``AdamW(fused=True)`` (``model.optimizer.fused=true``); ``all``: every switch at once;
  ``compile_max_autotune`` / ``compile_cudagraphs``: ``model.compile=max-autotune`` /
  ``reduce-overhead`` alone; ``all_max_autotune`` / ``all_cudagraphs``: ``all`` with that mode.

``batch`` takes a list (a batch-size sweep: every variant at every size, one row each).

Reports images/s (median over ``repeats`` timings of ``steps`` steps after ``warmup``), the model's
FLOPs per training step counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and
convolutions, forward and backward, counted once in fp32) and, when ``peak_tflops`` is given, the model
FLOP utilisation: FLOPs per step / seconds per step / peak. ``compile`` and ``all`` take minutes to
compile on a CPU and are skipped there unless named in ``variants``.
"""

from __future__ import annotations

import functools
import sys

import torch
from common import machine_line, median, parse_args, table, timed
from torch.utils.flop_counter import FlopCounterMode

from lightning_diff.diffusion import DiscreteSchedule
from lightning_diff.models import DDPM
from lightning_diff.nets import UNet

VARIANTS = {
    "fp32": {},
    "bf16": {"bf16": True},
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "fused": {"fused": True},
    "all": {"bf16": True, "compile": True, "channels_last": True, "fused": True},
    "compile_max_autotune": {"compile": "max-autotune"},
    "compile_cudagraphs": {"compile": "reduce-overhead"},
    "all_max_autotune": {"bf16": True, "compile": "max-autotune", "channels_last": True, "fused": True},
    "all_cudagraphs": {"bf16": True, "compile": "reduce-overhead", "channels_last": True, "fused": True},
}
DEFAULTS = {
    "variants": list(VARIANTS),
    "batch": [128],
    "steps": 30,
    "warmup": 5,
    "repeats": 3,
    "resolution": 32,
    "peak_tflops": 0.0,
    "threads": 0,
}


def cifar_unet(resolution: int) -> UNet:
    torch.manual_seed(0)
    return UNet(
        in_channels=3,
        resolution=resolution,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
    )


def make_step(switches: dict, device: str, batch: int, resolution: int):
    model = DDPM(
        cifar_unet(resolution),
        DiscreteSchedule(),
        sigma_data=0.5,
        optimizer=functools.partial(torch.optim.AdamW, lr=2e-4, fused=switches.get("fused")),
        compile=switches.get("compile", False),
        channels_last=switches.get("channels_last", False),
    ).to(device)
    optimizer = model.configure_optimizers()["optimizer"]
    data = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=switches.get("bf16", False))

    def forward_backward() -> None:
        with autocast:
            loss = model.loss(data, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def update() -> None:
        optimizer.step()
        model.ema.update_parameters(model.net)

    def step() -> None:
        forward_backward()
        update()

    step.forward_backward, step.update = forward_backward, update  # for bench/profile_step.py
    return model, step


def run_steps(step, count: int) -> None:
    for _ in range(count):
        step()


def flops_per_step(batch: int, resolution: int, device: str) -> int:
    model, _ = make_step({}, device, batch, resolution)
    data = torch.rand(batch, 3, resolution, resolution, device=device)
    with FlopCounterMode(display=False) as counter:
        model.loss(data, torch.Generator(device=device).manual_seed(0)).mean().backward()
    return counter.get_total_flops()


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    named = any(a.startswith("variants=") for a in argv)
    variants = [v for v in args["variants"] if device == "cuda" or named or not VARIANTS[v].get("compile")]
    res = args["resolution"]
    params = sum(p.numel() for p in cifar_unet(res).parameters())
    print(
        f"{machine_line()}; UNet {params:,} parameters ({params / 1e6:.1f}M) at {res}x{res}; "
        f"{args['steps']} steps after {args['warmup']}, median of {args['repeats']}\n"
    )
    rows = []
    for batch in args["batch"]:
        flops = flops_per_step(batch, res, device)
        print(f"batch {batch}: {flops / 1e9:.1f} GFLOP per training step (FlopCounterMode, fwd + bwd)")
        base = None
        for name in variants:
            model, step = make_step(VARIANTS[name], device, batch, res)
            for _ in range(args["warmup"]):
                step()
            seconds = median([timed(run_steps, step, args["steps"]) for _ in range(args["repeats"])])
            per_step = seconds / args["steps"]
            ips = batch / per_step
            base = base or ips
            achieved = flops / per_step / 1e12
            mfu = f"{100 * achieved / args['peak_tflops']:.1f}%" if args["peak_tflops"] else "n/a"
            rows.append(
                [
                    name,
                    batch,
                    f"{1000 * per_step:.1f}",
                    f"{ips:.1f}",
                    f"{ips / base:.2f}",
                    f"{achieved:.3f}",
                    mfu,
                ]
            )
            print("  ".join(map(str, rows[-1])), flush=True)  # as it goes: compiling variants take minutes
            del model, step
            if device == "cuda":
                torch.cuda.empty_cache()
    header = ["variant", "batch", "ms / step", "images/s", f"vs {variants[0]}", "achieved TFLOP/s", "MFU"]
    print(table(header, rows))
    skipped = [v for v in args["variants"] if v not in variants]
    if skipped:
        print(f"\nskipped on the CPU (compiling the 35.7M UNet takes minutes): {', '.join(skipped)}")


if __name__ == "__main__":
    main(sys.argv[1:])
