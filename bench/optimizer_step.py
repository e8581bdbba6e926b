"""Time of one AdamW step on the nets of ``train_overhead.py`` for each implementation torch offers.

    .venv/bin/python bench/optimizer_step.py threads=1
    .venv/bin/python bench/optimizer_step.py case=cifar steps=100          # on a GPU

``default`` is what torch picks when neither ``foreach`` nor ``fused`` is given (the single-tensor
loop on a CPU, ``foreach`` on CUDA), ``foreach`` the multi-tensor path, ``fused`` one kernel over all
parameters (``model.optimizer.fused``, the configs' default). Gradients are fixed random tensors, so
only the optimiser's own cost is timed: median over ``repeats`` timings of ``steps`` steps after
``warmup``. Writes a Markdown table to stdout.
"""

from __future__ import annotations

import sys

import torch
from common import machine_line, median, parse_args, table, timed
from train_overhead import build

VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
DEFAULTS = {"case": ["mlp", "unet"], "steps": 200, "warmup": 10, "repeats": 3, "threads": 0}


def run_steps(optimizer: torch.optim.Optimizer, count: int) -> None:
    for _ in range(count):
        optimizer.step()


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{machine_line()}; {args['steps']} steps after {args['warmup']}, median of {args['repeats']}\n")
    rows = []
    for case in args["case"]:
        _, model = build(case)
        params = list(model.net.to(device).parameters())
        generator = torch.Generator(device=device).manual_seed(0)
        for p in params:
            p.grad = 1e-3 * torch.randn(p.shape, generator=generator, device=device)
        base = None
        for name, options in VARIANTS.items():
            optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
            run_steps(optimizer, args["warmup"])
            seconds = median([timed(run_steps, optimizer, args["steps"]) for _ in range(args["repeats"])])
            ms = 1000 * seconds / args["steps"]
            base = base or ms
            rows.append([case, len(params), f"{sum(p.numel() for p in params) / 1e6:.2f}M", name,
                         f"{ms:.3f}", f"{base / ms:.2f}"])  # fmt: skip
    print(table(["case", "tensors", "parameters", "AdamW", "ms / step", "speed-up"], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
