"""End-to-end FID at scale: N generated 32x32 images, their Inception features through torch-fidelity,
and the Frechet distance (and KID) against cached reference statistics, each part timed.

    python bench/fid_at_scale.py num_samples=50000 batch=1024 compile=reduce-overhead bf16=true  # a GPU
    .venv/bin/python bench/fid_at_scale.py num_samples=64 batch=32 steps=2 compile=false         # dry run

Parts, each timed on its own: ``sampling`` (our DDIM, ``steps`` steps, on the 35.7M CIFAR UNet of
``bench/unet_throughput.py`` with random weights: speed does not depend on training; ``compile`` is
``sampler.compile``'s mode); ``reference`` (the reference set's Inception statistics, computed once and
cached by torch-fidelity under ``cache_dir``); ``metric`` (the samples' features and FID/KID against
the cached statistics: what every later evaluation pays). The reference is ``num_samples`` uniform
random images unless ``reference=FILE.npy`` (N x 3 x 32 x 32, uint8 or [-1, 1]) is given.

The Inception weights come from ``weights=FILE`` (a torch-fidelity Inception-v3 state dict); without
it a randomly initialised network is saved to ``cache_dir`` and used (``save_random_inception``),
which times the same work (no download: the GPU machines here have no network). The FID value is then
meaningless and is printed only to show the pipeline ran.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import machine_line, parse_args, sync, table, timed

from lightning_diff.diffusion import DiscreteSchedule, Sampler, VPDenoiser, sample_ddim
from lightning_diff.diffusion.random import SampleGenerators
from lightning_diff.metrics.fidelity import inception_metrics, save_random_inception

DEFAULTS = {
    "num_samples": 50000,
    "batch": 1024,
    "steps": 50,
    "compile": "reduce-overhead",
    "bf16": True,
    "weights": "",
    "reference": "",
    "cache_dir": "",
    "feature_batch": 500,
}


def main(argv: list[str]) -> None:
    args = parse_args(argv, DEFAULTS, __doc__)
    from unet_throughput import cifar_unet

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_dir = Path(args["cache_dir"] or tempfile.mkdtemp(prefix="fid-at-scale-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights = Path(args["weights"]) if args["weights"] else cache_dir / "inception_random.pth"
    if not weights.is_file() and not args["weights"]:
        save_random_inception(weights)
    n, batch = args["num_samples"], args["batch"]
    schedule = DiscreteSchedule().to(device)
    denoiser = VPDenoiser(cifar_unet(32), schedule, "eps").to(device).eval()
    sampler = Sampler(sample_ddim, args["steps"], compile=args["compile"])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args["bf16"])
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)

    def sample_all() -> None:
        for start in range(0, n, batch):
            rows = range(start, min(start + batch, n))
            with autocast:
                x, _ = sampler(
                    denoiser, schedule, (len(rows), 3, 32, 32), SampleGenerators(rows, seed=0), device
                )
            images[start : start + len(rows)] = (
                ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
            )

    with autocast:  # compile (and record CUDA graphs) outside the timed part, at the batch size used
        sampler(denoiser, schedule, (batch, 3, 32, 32), SampleGenerators(range(batch), seed=1), device)
        sampler(denoiser, schedule, (batch, 3, 32, 32), SampleGenerators(range(batch), seed=1), device)
    sync()
    rows = [
        [
            "sampling",
            n,
            f"{timed(sample_all):.1f}",
            f"DDIM {args['steps']} steps, compile={sampler.compile or 'false'}",
        ]
    ]
    print("  ".join(map(str, rows[-1])), flush=True)
    if args["reference"]:
        reference = torch.from_numpy(np.load(args["reference"]))
    else:
        reference = torch.randint(
            0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        )
    options = {
        "reference_name": f"bench-{len(reference)}-{args['reference'] or 'uniform'}",
        "weights_path": weights,
        "cache_dir": cache_dir,
        "batch_size": args["feature_batch"],
        "kid_subsets": 100,
    }
    result: dict = {}

    def metric() -> None:
        result.update(inception_metrics(images, reference, **options))

    first = timed(metric)  # the reference's statistics are computed and cached here
    second = timed(metric)  # and read from the cache here
    rows.append(
        ["reference + metric", n, f"{first:.1f}", "first evaluation: reference features computed and cached"]
    )
    rows.append(
        ["metric", n, f"{second:.1f}", "later evaluations: sample features, FID and KID; reference cached"]
    )
    print(f"{machine_line()}; weights {weights}; cache {cache_dir}\n")
    print(table(["part", "images", "seconds", "what"], rows))
    fid, kid = result.get("fid_inception", float("nan")), result.get("kid_inception_mean", float("nan"))
    note = "" if args["weights"] else " (random Inception weights: timing only)"
    print(f"\nFID {fid:.2f}, KID {kid:.4f}{note}")


if __name__ == "__main__":
    main(sys.argv[1:])
