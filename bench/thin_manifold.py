"""The default families on vector data the project was not developed on: a thin curve and a 6-D mixture.

    .venv/bin/python bench/thin_manifold.py                                      # knot and mix6, 2000 steps
    .venv/bin/python bench/thin_manifold.py data=knot scaling=raw,z steps=10000 models=ddpm
    .venv/bin/python bench/thin_manifold.py data=knot scaling=z steps=10000 models=ddpm schedule=cosine
    .venv/bin/python bench/thin_manifold.py report=a.jsonl,b.jsonl                 # tables of saved rows

Data (written by this script, 4000 points each, 3600 for training and 400 held out):
- ``knot``: a (3, 5) torus knot in 3-D, scaled by 5 and moved to x = 20, with Gaussian noise of
  0.15 per coordinate: a curve about 2% of the data's scale thick (standard deviations 7.5, 7.4, 3.5).
- ``mix6``: a 6-D mixture of 5 components with axis scales from 0.015 to 2.4.

``scaling=z`` trains on the standardised file (each coordinate to mean 0, standard deviation 1) and
maps the samples back; ``raw`` trains on the file as it is. Each model is trained through ``ld-train
data=array`` with everything else at its default (``schedule=cosine`` sets DDPM's
``model.schedule.kind``), and ``ld-sample``'s default sampler draws ``num_samples`` samples.

Per run, against the 400 held-out points (HO) and the 3600 training points (TR):
- ``nn_ratio``: median distance of a sample to its nearest TR point over that of an HO point (1 for a
  model of the distribution, above 1 for blur, 0 for copies);
- ``off``: share of samples farther from TR than 3 times the 99th percentile of HO's distances;
- ``sw``: sliced 2-Wasserstein distance (200 directions) of 400 samples to HO, over the data's mean
  standard deviation, averaged over 20 draws of the 400 (fewer samples: as many HO points);
- ``reach``: the largest |x - mean| / std over samples and coordinates (the training data's is given).
The adversaries are scored the same way: the moment-matched Gaussian, a kernel density estimate
with Scott's bandwidth per coordinate, and copies of training points (the floor of ``sw``).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import array_run_overrides, machine_line, parse_args, table
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from lightning_diff.cli import CONF_DIR
from lightning_diff.cli.sample import sample
from lightning_diff.cli.train import train

MODELS = {
    "ddpm": ["model=ddpm"],
    "vp": ["model=score_sde", "model/sde=vp"],
    "ve": ["model=score_sde", "model/sde=ve"],
}
ADVERSARIES = ["gaussian", "kde_scott", "copies"]
NUM_TRAIN = 3600


def make_data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    n = 4000
    if kind == "knot":
        t = rng.uniform(0, 2 * np.pi, n)
        r = np.cos(5 * t) + 2
        curve = np.stack([r * np.cos(3 * t), r * np.sin(3 * t), -np.sin(5 * t)], 1) * 5
        x = curve + np.array([20.0, 0, 0]) + rng.normal(scale=0.15, size=curve.shape)
    else:
        means = rng.normal(scale=6, size=(5, 6))
        scales = np.array([0.05, 0.3, 1, 2, 4, 8]) * 0.3
        x = means[rng.integers(0, 5, n)] + rng.normal(size=(n, 6)) * scales
    order = np.random.default_rng(0).permutation(n)
    return x[order].astype(np.float32)


def nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each row of ``a`` to its nearest row of ``b``."""
    out = np.empty(len(a))
    for start in range(0, len(a), 500):
        block = a[start : start + 500, None, :] - b[None, :, :]
        out[start : start + 500] = np.sqrt((block**2).sum(-1).min(1))
    return out


def sliced_w2(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
    pa, pb = np.sort(a @ directions, 0), np.sort(b @ directions, 0)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


def scores(samples: np.ndarray, train_x: np.ndarray, heldout: np.ndarray) -> dict[str, float]:
    ho_nn, nn = nearest(heldout, train_x), nearest(samples, train_x)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(train_x.shape[1], 200))
    directions /= np.linalg.norm(directions, axis=0)
    scale = train_x.std(0).mean()
    m = min(len(samples), len(heldout))
    draws = [(rng.permutation(len(samples))[:m], rng.permutation(len(heldout))[:m]) for _ in range(20)]
    sw = [sliced_w2(samples[i], heldout[j], directions) / scale for i, j in draws]
    mean, std = train_x.mean(0), train_x.std(0)
    return {
        "nn_ratio": float(np.median(nn) / np.median(ho_nn)),
        "off": float((nn > 3 * np.quantile(ho_nn, 0.99)).mean()),
        "sw": float(np.mean(sw)),
        "reach": float((np.abs(samples - mean) / std).max()),
    }


def adversary(name: str, train_x: np.ndarray, n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    if name == "gaussian":
        return rng.multivariate_normal(train_x.mean(0), np.cov(train_x.T), n)
    if name == "kde_scott":
        width = train_x.std(0) * len(train_x) ** (-1 / (train_x.shape[1] + 4))
        return train_x[rng.integers(0, len(train_x), n)] + rng.normal(size=(n, train_x.shape[1])) * width
    return train_x[rng.permutation(len(train_x))[:n]]


def run_model(model, path, steps, seed, schedule, num_samples, run_dir) -> tuple[np.ndarray, float]:
    overrides = array_run_overrides(path, MODELS[model], steps, seed)
    if schedule and model == "ddpm":
        overrides.append(f"model.schedule.kind={schedule}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        start = time.perf_counter()
        train(cfg)
        train_s = time.perf_counter() - start
        out = Path(run_dir) / "samples.npy"
        ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
        scfg = compose("sample", overrides=[f"ckpt={ckpt}", f"num_samples={num_samples}", f"out={out}"])
    return np.asarray(sample(scfg), dtype=np.float64), train_s


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(rows: list[dict]) -> str:
    groups: dict = {}
    for row in rows:
        key = (row["data"], row["scaling"], row["model"], row.get("schedule") or "", row["steps"])
        groups.setdefault(key, []).append(row)
    header = ["data", "scaling", "model", "steps", "seeds", "nn_ratio", "off", "sw", "reach (data's)"]
    lines = []
    for (data, scaling, model, schedule, steps), cells in groups.items():
        name = f"{model} ({schedule})" if schedule else model
        reach = f"{max(c['reach'] for c in cells):.2f} ({cells[0]['data_reach']:.2f})"
        stats = [spread([c[k] for c in cells]) for k in ("nn_ratio", "off", "sw")]
        lines.append([data, scaling, name, steps or "-", len(cells), *stats, reach])
    return table(header, lines)


def main(argv):
    args = parse_args(
        argv,
        {
            "data": ["knot", "mix6"],
            "scaling": ["raw"],
            "models": list(MODELS),
            "schedule": "",
            "steps": 2000,
            "seeds": [0, 1, 2],
            "num_samples": 2000,
            "adversaries": True,
            "out": "",
            "report": [""],
        },
        __doc__,
    )
    if args["report"] != [""]:
        rows = [json.loads(line) for path in args["report"] for line in Path(path).read_text().splitlines()]
        print(report(rows))
        return
    print(machine_line())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args["data"]:
            full = make_data(kind).astype(np.float64)
            train_x, heldout = full[:NUM_TRAIN], full[NUM_TRAIN:]
            mean, std = train_x.mean(0), train_x.std(0)
            data_reach = float((np.abs(train_x - mean) / std).max())
            common = {"data": kind, "data_reach": data_reach}
            if args["adversaries"]:
                for name in ADVERSARIES:
                    drawn = adversary(name, train_x, args["num_samples"])
                    rows.append({**common, "scaling": "-", "model": name, "steps": 0, "seed": 0})
                    rows[-1].update(scores(drawn, train_x, heldout))
            for scaling in args["scaling"]:
                fitted = (train_x - mean) / std if scaling == "z" else train_x
                path = Path(tmp) / f"{kind}_{scaling}.npy"
                np.save(path, fitted.astype(np.float32))
                for model in args["models"]:
                    for seed in args["seeds"]:
                        run_dir = Path(tmp) / f"{kind}_{scaling}_{model}_{seed}"
                        drawn, train_s = run_model(
                            model, path, args["steps"], seed, args["schedule"], args["num_samples"], run_dir
                        )
                        if scaling == "z":
                            drawn = drawn * std + mean
                        row = {**common, "scaling": scaling, "model": model, "steps": args["steps"]}
                        row.update(seed=seed, schedule=args["schedule"], train_s=round(train_s, 1))
                        row.update(scores(drawn, train_x, heldout))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    if args["out"]:
        with open(args["out"], "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(report(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
