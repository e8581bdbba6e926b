"""Every family and parameterisation, every sampler, on a user's own 2-D data with the default config.

    .venv/bin/python bench/vector_matrix.py                         # every cell, one process
    .venv/bin/python bench/vector_matrix.py models=ddpm_eps,ddpm_edm steps=3000 seeds=0,1,2
    .venv/bin/python bench/vector_matrix.py out=a.jsonl seeds=0         # cells appended to a file ...
    .venv/bin/python bench/vector_matrix.py report=a.jsonl,b.jsonl      # ... tables of several runs

Two data sets are written as ``.npy`` files and trained through ``ld-train data=array`` exactly as
the README's example does: 4000 points of a correlated 2-D Gaussian (mean (1, -0.5), standard
deviations 1.2 and 0.25, rotated by 30 degrees) and 4000 points of a three-component mixture. Each
model is trained ``steps`` steps with everything else at its default, then every sampler at its
default step count draws ``num_samples`` samples. Per cell: the share of samples beyond 1.5 times
the training data's radius (``far``), the covariance error relative to the true covariance
(Gaussian), the share of samples farther than 5 standard deviations from every component and the
largest error of the mixture weights (mixture), and the model evaluations per sample. With several
seeds each statistic is given as mean ± standard deviation over the seeds (each seed trains anew and
samples with its own generator; the data files stay the same).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import array_run_overrides, machine_line, parse_args, table
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_diff.cli import CONF_DIR
from lightning_diff.cli.train import train
from lightning_diff.metrics.outliers import covariance_error, mixture_report, outlier_fraction

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
    overrides = array_run_overrides(path, MODELS[model_name], steps, seed)
    overrides.append("callbacks.evaluation.num_samples=500")
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
    digits = 2 if pct else 3
    return f"{mean:.{digits}f}{unit} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}{unit}"


def report(rows: list[dict], models: list[str], samplers: list[str], data: list[str]) -> str:
    """Markdown tables (one per data set) of the cells in ``rows``, seeds merged."""
    results: dict = {}
    for row in rows:
        results.setdefault((row["data"], row["model"], row["sampler"]), []).append(row)
    out = []
    for data_kind in data:
        stats = ["cov_err"] if data_kind == "gauss" else ["between", "weight_err"]
        header = ["model", "sampler", "NFE", "seeds", "far (beyond 1.5 radii)", *stats]
        lines = []
        for model_name in models:
            for sampler in samplers:
                cells = results.get((data_kind, model_name, sampler))
                if not cells:
                    continue
                line = [
                    model_name,
                    sampler,
                    cells[0]["nfe"],
                    len(cells),
                    spread([c["far"] for c in cells], True),
                ]
                lines.append(line + [spread([c[s] for c in cells], pct=s == "between") for s in stats])
        if lines:
            first = rows[0]
            out.append(
                f"\n{data_kind}: {first['num_train']} training points, {first['steps']} steps, "
                f"{first['num_samples']} samples\n" + table(header, lines)
            )
    return "\n".join(out)


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
            "out": "",
            "report": [""],
        },
        __doc__,
    )
    if args["report"] != [""]:
        rows = [json.loads(line) for path in args["report"] for line in Path(path).read_text().splitlines()]
        print(report(rows, args["models"], args["samplers"], args["data"]))
        return
    print(machine_line())
    rows = []
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
                        row = {"data": data_kind, "model": model_name, "sampler": sampler, "seed": seed}
                        row.update(cell, steps=args["steps"], num_train=args["num_train"])
                        row["num_samples"] = args["num_samples"]
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                        if args["out"]:
                            with open(args["out"], "a") as f:
                                f.write(json.dumps(row) + "\n")
    print(report(rows, args["models"], args["samplers"], args["data"]))


if __name__ == "__main__":
    main(sys.argv[1:])
