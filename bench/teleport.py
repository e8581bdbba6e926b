"""Analytical teleportation (Wang & Vastola 2024) against skip fraction on one checkpoint.

    .venv/bin/python bench/teleport.py ckpt=runs/deviation/checkpoints/last.ckpt num_samples=500

For each inner sampler (DDIM over a 50-step grid, Heun over an 18-step grid) and skip fraction
0, 0.1, ..., 0.4, the first steps are replaced by the closed-form flow of the training set's
Gaussian and the model runs the rest of the same grid. Prints a Markdown table of model
evaluations used and saved per sample and the sample metrics of ``ld-eval`` (held-out Frechet distance
at equal size with its interval and floor, the data-copying statistic, digits-CNN Frechet
distance to the training set, sliced Wasserstein distance to the held-out split, memorized
fraction). Every row uses the same seeds, (12345, i) for sample i.
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
from lightning_diff.generation import generate
from lightning_diff.metrics.pipeline import evaluate_samples

SKIPS = (0.0, 0.1, 0.2, 0.3, 0.4)
SAMPLERS = (("teleport_ddim", 50), ("teleport_heun", 18))


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    num_samples = int(args.get("num_samples", 500))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the scripts use a GPU by themselves
    model, run_cfg = load_model(args["ckpt"], device)
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("fit")
    shape = tuple(datamodule.data_shape)
    print(f"checkpoint {args['ckpt']}, {num_samples} samples; {machine_line()}\n")
    print(
        "| inner sampler | grid steps | skip | sigma at hand-over | NFE used | NFE saved | seconds | fd "
        "| fd vs held-out [interval] (floor) | C_T | sliced W2 | memorized |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, steps in SAMPLERS:
        for skip in SKIPS:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(
                    "eval",
                    overrides=[
                        f"sampler={name}",
                        f"sampler.num_steps={steps}",
                        f"sampler.skip_fraction={skip}",
                    ],
                )
            teleport = instantiate(cfg.sampler)
            start = time.perf_counter()
            samples, nfe = generate(
                model, range(num_samples), shape, teleport, seed=12345, batch_size=num_samples
            )
            sync()
            seconds = time.perf_counter() - start
            sigmas = model.schedule.sampling_sigmas(steps, teleport.inner.spacing)
            handover = float(sigmas[teleport.skip_index(sigmas)])
            metrics, _ = evaluate_samples(
                samples, datamodule, kid=False, cache_dir=Path(".cache/lightning_diff")
            )
            key = next(k for k in metrics if k.startswith("fd_") and k.endswith("_vs_heldout"))
            fd = metrics[key.removesuffix("_vs_heldout")]  # to the training set's statistics
            held = (
                f"{metrics[key]:.1f} [{metrics[key + '_ci_low']:.1f}, {metrics[key + '_ci_high']:.1f}] "
                f"({metrics[key + '_floor']:.1f})"
            )
            print(
                f"| {name.removeprefix('teleport_')} | {steps} | {skip:.0%} | {handover:.3g} | {nfe} | "
                f"{teleport.saved_nfe} | {seconds:.1f} | {fd:.2f} | {held} | {metrics['data_copying_ct']:.1f} | "
                f"{metrics['sliced_wasserstein']:.3f} | {metrics['memorized_fraction']:.3f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
