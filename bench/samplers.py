"""Every sampler on one checkpoint: model evaluations, wall time and sample quality.

    .venv/bin/python bench/samplers.py ckpt=runs/demo/checkpoints/last.ckpt num_samples=200

Prints a Markdown table (sampler, steps, NFE per sample, seconds, samples/s, and the metrics of
``ld-eval``: digits-CNN Frechet distance, sliced Wasserstein distance). Sample i comes from the
seed (sample_seed, i) for every sampler, so rows differ only by the sampler.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from common import machine_line, sync
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_diff.checkpoints import load_model
from lightning_diff.cli import CONF_DIR
from lightning_diff.cli.sample import build_sampler
from lightning_diff.generation import generate
from lightning_diff.metrics.pipeline import evaluate_samples

# (config name, step count) pairs to time; each sampler at a few budgets.
RUNS = [
    ("ddim", 10),
    ("ddim", 50),
    ("ancestral", 100),
    ("ancestral", 250),
    ("euler_maruyama", 100),
    ("euler_maruyama", 250),
    ("pc", 50),
    ("pc", 100),
    ("heun", 10),
    ("heun", 25),
    ("ode", 1000),
]


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    num_samples = int(args.get("num_samples", 200))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the scripts use a GPU by themselves
    model, run_cfg = load_model(args["ckpt"], device)
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("fit")
    shape = tuple(datamodule.data_shape)
    print(f"checkpoint {args['ckpt']}, {num_samples} samples; {machine_line()}\n")
    print("| sampler | steps | NFE / sample | seconds | samples/s | fd | sliced W2 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, steps in RUNS:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=[f"ckpt={args['ckpt']}", f"sampler={name}", f"num_steps={steps}"])
        sampler = build_sampler(cfg, model)
        start = time.perf_counter()
        samples, nfe = generate(model, range(num_samples), shape, sampler, seed=12345, batch_size=num_samples)
        sync()
        seconds = time.perf_counter() - start
        metrics, _ = evaluate_samples(samples, datamodule, kid=False, cache_dir=Path(".cache/lightning_diff"))
        fd = next(v for k, v in metrics.items() if k.startswith("fd_") and not k.endswith("_heldout"))
        print(
            f"| {name} | {steps} | {nfe} | {seconds:.1f} | {num_samples / seconds:.0f} | {fd:.2f} | "
            f"{metrics['sliced_wasserstein']:.3f} |"
        )
    heldout = next(v for k, v in metrics.items() if k.endswith("_heldout"))
    train = metrics["sliced_wasserstein_train"]
    print(f"\nreal data: held-out fd {heldout:.2f}; training-set sliced W2 {train:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
