"""Kernel-level profile of one training step of the CIFAR-10 UNet: where the step's time goes.

    .venv/bin/python bench/profile_step.py batch=128 variant=all               # GPU: CUDA kernels
    .venv/bin/python bench/profile_step.py batch=2 resolution=8 variant=fp32   # CPU dry run: CPU ops

The step is ``bench/unet_throughput.py``'s (the module's loss, backward, AdamW, EMA) with one of its
variants. After ``warmup`` steps, ``torch.profiler`` records ``steps`` steps, the forward and backward
pass and the update (AdamW and the EMA) in separate recordings: every kernel (CUDA) or ATen operator
(CPU) of the update counts as "optimizer and EMA"; those of the forward and backward pass are put in
a group by their name: convolution, group norm, attention (batched matrix products, softmax,
scaled dot-product kernels), matmul (linear layers), copy and cast, elementwise (the rest of the
pointwise and reduction kernels, compiled Triton kernels included) and other. Prints the share of
each group and the ``top`` kernels by their own device time, as Markdown tables.

On a GPU the grouping is of device time (what the GPU did); on a CPU it is self CPU time of ATen
operators, which is a dry run of the tool rather than a profile worth reading.
"""

from __future__ import annotations

import re
import sys

import torch
from common import machine_line, parse_args, table
from torch.profiler import ProfilerActivity, profile
from unet_throughput import VARIANTS, make_step

DEFAULTS = {"variant": "all", "batch": 128, "resolution": 32, "warmup": 3, "steps": 1, "top": 15}

# First match wins; names are CUDA kernel names (cuDNN, cuBLAS, Triton, ATen) or ATen operators.
GROUPS = [
    ("convolution", r"conv|cudnn|implicit_gemm|sm\d+_xmma_fprop|dgrad|wgrad|winograd|nchw|nhwc.*kernel"),
    ("group norm", r"group_norm|groupnorm|native_group_norm|welford|GroupNorm"),
    ("attention", r"softmax|bmm|baddbmm|flash|fmha|attention|efficient_attention|sdpa"),
    ("matmul", r"gemm|addmm|\bmm\b|aten::mm|linear|cublas|cutlass|sm\d+_xmma"),
    ("copy and cast", r"copy|to_copy|cast|convert|contiguous|memcpy|memset|clone"),
    (
        "elementwise",
        r"elementwise|vectorized|unrolled|reduce|triton|pointwise|silu|sigmoid|mul|add|div|sum|mean|sqrt|exp|cat|fill",
    ),
]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in GROUPS]


def group_of(name: str) -> str:
    for group, pattern in _COMPILED:
        if pattern.search(name):
            return group
    return "other"


def kernel_times(prof, device: str) -> dict[str, float]:
    """Microseconds of own time per kernel (CUDA) or ATen operator (CPU) name."""
    times: dict[str, float] = {}
    for event in prof.key_averages():
        if device == "cuda":
            own = getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0)
            if own <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            own = event.self_cpu_time_total
            if own <= 0 or not event.key.startswith("aten::"):
                continue
        times[event.key] = times.get(event.key, 0.0) + own
    return times


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    if args["variant"] not in VARIANTS:
        sys.exit(f"error: variant={args['variant']!r} is not one of {', '.join(VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    _, step = make_step(VARIANTS[args["variant"]], device, args["batch"], args["resolution"])
    for _ in range(args["warmup"]):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    times: dict[str, float] = {}
    groups: dict[str, str] = {}
    for _ in range(args["steps"]):
        for part, fixed_group in ((step.forward_backward, None), (step.update, "optimizer and EMA")):
            with profile(activities=activities) as prof:
                part()
                if device == "cuda":
                    torch.cuda.synchronize()
            for name, micros in kernel_times(prof, device).items():
                key = f"{name} [update]" if fixed_group else name
                times[key] = times.get(key, 0.0) + micros
                groups[key] = fixed_group or group_of(name)
    total = sum(times.values())
    if total <= 0:
        sys.exit("error: the profiler recorded no kernel time")
    per_group: dict[str, float] = {}
    for name, micros in times.items():
        per_group[groups[name]] = per_group.get(groups[name], 0.0) + micros
    unit = "device" if device == "cuda" else "self CPU"
    print(
        f"{machine_line()}; variant {args['variant']}, batch {args['batch']} at "
        f"{args['resolution']}x{args['resolution']}; {args['steps']} step(s) after {args['warmup']}; "
        f"{total / 1000 / args['steps']:.2f} ms {unit} time per step in {len(times)} kernels\n"
    )
    rows = [
        [group, f"{micros / 1000 / args['steps']:.2f}", f"{100 * micros / total:.1f}%"]
        for group, micros in sorted(per_group.items(), key=lambda kv: -kv[1])
    ]
    print(table(["group", f"ms {unit} / step", "share"], rows) + "\n")
    top = sorted(times.items(), key=lambda kv: -kv[1])[: args["top"]]
    rows = [
        [
            name[:90].replace("|", "/"),
            groups[name],
            f"{micros / 1000 / args['steps']:.3f}",
            f"{100 * micros / total:.1f}%",
        ]
        for name, micros in top
    ]
    print(table(["kernel", "group", "ms / step", "share"], rows))


if __name__ == "__main__":
    main(sys.argv[1:])
