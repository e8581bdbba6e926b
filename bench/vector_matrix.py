"""Every family and parameterisation, every sampler, on a user's own 2-D data with the default config.

    .venv/bin/python bench/vector_matrix.py                         # the README's table
    .venv/bin/python bench/vector_matrix.py models=ddpm_eps,ddpm_edm steps=3000 seeds=0,1,2

Two data sets are written as ``.npy`` files and trained through ``ld-train data=array`` exactly as
the README's example does: 4000 points of a correlated 2-D Gaussian (mean (1, -0.5), standard
deviations 1.2 and 0.25, rotated by 30 degrees) and 4000 points of a three-component mixture. Each
model is trained ``steps`` steps with everything else at its default, then every sampler at its
default step count draws ``num_samples`` samples. Per cell: the share of samples beyond 1.5 times
the training data's radius (``far``), the covariance error relative to the true covariance
(Gaussian), the share of samples farther than 5 standard deviations from every component and the
largest error of the mixture weights (mixture), and the model evaluations per sample.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_line, parse_args, table
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_diff.cli import CONF_DIR
from lightning_diff.metrics.outliers import covariance_error, mixture_report, outlier_fraction
from lightning_diff.train import train

MODELS = {
    "ddpm_eps": ["model=ddpm", "model.prediction=eps"],
    "ddpm_x0": ["model=ddpm", "model.prediction=x0"],
    "ddpm_v": ["model=ddpm", "model.prediction=v"],
    "ddpm_edm": ["model=ddpm", "model.prediction=edm"],
    "vp_eps": ["model=score_sde", "model/sde=vp", "model.prediction=eps"],
    "vp_edm": ["model=score_sde", "model/sde=vp", "model.prediction=edm"],
    "subvp_edm": ["model=score_sde", "model/sde=subvp", "model.prediction=edm"],
    "ve_eps": ["model=score_sde", "model/sde=ve", "model.prediction=eps"],
    "ve_edm": ["model=score_sde", "model/sde=ve", "model.prediction=edm"],
    "gaussian": ["model=gaussian"],
    "gmm": ["model=gmm", "model.num_components=3"],
}
SAMPLERS = ["ddim", "ancestral", "euler_maruyama", "pc", "heun", "ode"]

ROTATION = math.radians(30)
GAUSS_MEAN = np.array([1.0, -0.5])
_R = np.array([[math.cos(ROTATION), -math.sin(ROTATION)], [math.sin(ROTATION), math.cos(ROTATION)]])
GAUSS_COV = _R @ np.diag([1.2**2, 0.25**2]) @ _R.T
MIX_MEANS = np.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]])
MIX_COVS = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.3]], [[0.15, 0.0], [0.0, 0.15]]])
MIX_WEIGHTS = np.array([0.5, 0.3, 0.2])


def make_data(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return rng.multivariate_normal(GAUSS_MEAN, GAUSS_COV, size=n).astype(np.float32)
    comp = rng.choice(3, size=n, p=MIX_WEIGHTS)
    out = np.empty((n, 2))
    for k in range(3):
        idx = comp == k
        out[idx] = rng.multivariate_normal(MIX_MEANS[k], MIX_COVS[k], size=int(idx.sum()))
    return out.astype(np.float32)


def run_cell(model_name, data_kind, path, steps, seed, num_samples, samplers, run_root):
    overrides = [
        "data=array",
        f"data.path={path}",
        *MODELS[model_name],
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "callbacks.evaluation.num_samples=500",
        f"seed={seed}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = str(Path(run_root) / f"{model_name}_{data_kind}_{seed}")
    start = time.perf_counter()
    _, objects = train(cfg)
    train_s = time.perf_counter() - start
    model, dm = objects["model"], objects["datamodule"]
    train_x = dm.train_tensor()
    rows = []
    for name in samplers:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            scfg = compose("train", overrides=[f"sampler={name}"])
        sampler = instantiate(scfg.sampler)
        # One generator for the batch: per-sample seeds (ld-sample's) cost a generator call per sample.
        x, nfe = model.sample(num_samples, (2,), sampler, torch.Generator().manual_seed(1000 + seed))
        x = x.double()
        cell = {"far": outlier_fraction(x, train_x), "nfe": nfe, "train_s": train_s}
        if data_kind == "gauss":
            cell["cov_err"] = covariance_error(x, torch.as_tensor(GAUSS_COV))
        else:
            rep = mixture_report(x, torch.as_tensor(MIX_MEANS), torch.as_tensor(MIX_COVS))
            cell["between"] = rep["between"]
            cell["weight_err"] = float(np.abs(np.array(rep["weights"]) - MIX_WEIGHTS).max())
        rows.append((name, cell))
    return rows


def spread(values: list[float], pct: bool = False) -> str:
    scale = 100 if pct else 1
    mean = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    unit = "%" if pct else ""
    return f"{mean:.2f}{unit} ± {sd:.2f}" if len(values) > 1 else f"{mean:.3g}{unit}"


def main(argv):
    args = parse_args(
        argv,
        {
            "models": list(MODELS),
            "samplers": SAMPLERS,
            "data": ["gauss", "mix"],
            "steps": 3000,
            "seeds": [0],
            "num_train": 4000,
            "num_samples": 4000,
        },
        __doc__,
    )
    print(machine_line())
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for data_kind in args["data"]:
            path = Path(tmp) / f"{data_kind}.npy"
            np.save(path, make_data(data_kind, args["num_train"], 2024))
            for model_name in args["models"]:
                for seed in args["seeds"]:
                    cells = run_cell(
                        model_name,
                        data_kind,
                        path,
                        args["steps"],
                        seed,
                        args["num_samples"],
                        args["samplers"],
                        tmp,
                    )
                    for sampler, cell in cells:
                        results.setdefault((data_kind, model_name, sampler), []).append(cell)
                        print(data_kind, model_name, seed, sampler, cell, flush=True)
    for data_kind in args["data"]:
        stats = ["cov_err"] if data_kind == "gauss" else ["between", "weight_err"]
        header = ["model", "sampler", "NFE", "far (beyond 1.5 radii)", *stats]
        rows = []
        for model_name in args["models"]:
            for sampler in args["samplers"]:
                cells = results[(data_kind, model_name, sampler)]
                row = [model_name, sampler, cells[0]["nfe"], spread([c["far"] for c in cells], pct=True)]
                row += [spread([c[s] for c in cells], pct=s == "between") for s in stats]
                rows.append(row)
        print(
            f"\n{data_kind}: {args['num_train']} training points, {args['steps']} steps, "
            f"{args['num_samples']} samples, seeds {args['seeds']}"
        )
        print(table(header, rows))


if __name__ == "__main__":
    main(sys.argv[1:])
