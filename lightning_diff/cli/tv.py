"""``ld-tv``: total variation between a known density and each sampler's output, beside its bound.

    ld-tv                                   # conf/tv.yaml: 2-D Gaussian, five samplers, a cross design
    ld-tv data=gaussian data.distribution.dim=1 out=tv_1d.json
    ld-tv data=gmm tv.num_samples=200000 steps=[10,20,50,100] score_errors=[] horizons=[]
    ld-tv perturbation=linear steps=[] horizons=[]   # a score error that grows with |x|

Writes ``out`` (JSON: ``rows``, one per cell, and ``summary``) and the figures beside it; see
:mod:`lightning_diff.tv_study` for what each column is and how TV is computed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_diff.cli import CONF_DIR, entry_point
from lightning_diff.errors import ConfigError
from lightning_diff.tv_report import figures, summarise
from lightning_diff.tv_study import cells, run_cell

log = logging.getLogger("lightning_diff.cli.tv")
SAMPLER_DIR = Path(CONF_DIR) / "sampler"


def load_sampler(name: str):
    path = SAMPLER_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SAMPLER_DIR.glob("*.yaml")))
        raise ConfigError(f"samplers: no sampler {name!r} in conf/sampler/; known: {known}")
    return instantiate(OmegaConf.load(path))


def study(cfg: DictConfig) -> dict:
    """Run every cell of ``cfg``; write and return ``{"rows": [...], "summary": {...}}``."""
    dist = instantiate(cfg.data.distribution)
    reference = OmegaConf.to_container(cfg.reference, resolve=True)
    tv_options = OmegaConf.to_container(cfg.tv, resolve=True)
    samplers = {name: load_sampler(name) for name in cfg.samplers}
    grid = cells(
        cfg.design, list(cfg.samplers), list(cfg.steps), list(cfg.score_errors), list(cfg.horizons), reference
    )
    rows = []
    for cell in grid:
        row = run_cell(
            dist, samplers[cell.sampler], cell, cfg.beta_min, cfg.eps, tv_options, str(cfg.perturbation)
        )
        log.info(
            "%s steps=%d eps=%g beta_max=%g: TV %.4g (bound %s)",
            cell.sampler,
            cell.steps,
            cell.score_error,
            cell.horizon,
            row["tv"],
            "n/a" if row.get("bound") is None else f"{row['bound']:.4g}",
        )
        rows.append(row)
    result = {
        "data": OmegaConf.to_container(cfg.data.distribution, resolve=True),
        "reference": reference,
        "perturbation": str(cfg.perturbation),
        "rows": rows,
        "summary": summarise(rows, reference, int(cfg.fit_steps_from)),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %d cells to %s", len(rows), out)
    if cfg.figures:
        for path in figures(rows, reference, out.parent, out.stem):
            log.info("figure: %s", path)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="tv")
@entry_point
def main(cfg: DictConfig) -> None:
    study(cfg)


if __name__ == "__main__":
    main()
