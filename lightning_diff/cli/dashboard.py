"""``ld-dashboard``: the project's wandb workspace (or report), built as code.

    ld-dashboard                                  # no key or no network: writes dashboard.json
    ld-dashboard kind=report sections=[frontier,nfe] out=reports/memorization.json
    ld-dashboard mode=online entity=my-team       # with WANDB_API_KEY set (or after wandb login)
    ld-dashboard mode=online from_spec=dashboard.json   # upload a spec written offline

``conf/dashboard.yaml`` lists the options; :mod:`lightning_diff.dashboard_spec` says what each section
plots and from which logged keys.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from lightning_diff.cli import CONF_DIR, entry_point
from lightning_diff.dashboard_spec import (
    build_dashboard,
    kind_of,
    read_spec,
    resolve_mode,
    upload,
    write_spec,
)
from lightning_diff.errors import ConfigError

log = logging.getLogger("lightning_diff.cli.dashboard")


def dashboard(cfg: DictConfig) -> dict:
    """Build the dashboard (or read ``from_spec``); save it to wandb when online, else write its spec
    to ``out``. Returns ``{"kind", "mode", "out"}`` offline, ``{"kind", "mode", "entity", "project"}``
    online."""
    mode = resolve_mode(cfg.mode)
    if cfg.from_spec:
        if mode == "offline":
            raise ConfigError(
                f"from_spec={cfg.from_spec} uploads a spec: it needs a wandb key (WANDB_API_KEY or "
                "`wandb login`) and mode=online, or auto with network"
            )
        board = read_spec(cfg.from_spec)
    else:
        board = build_dashboard(
            kind=cfg.kind,
            name=cfg.name,
            entity=cfg.entity,
            project=cfg.project,
            sections=list(cfg.sections),
            feature_space=cfg.feature_space,
            references=None if cfg.references is None else list(cfg.references),
        )
    kind = kind_of(board)
    if mode == "offline":
        path = write_spec(board, cfg.out)
        log.info(
            "wrote the %s spec to %s; upload it with: ld-dashboard mode=online from_spec=%s", kind, path, path
        )
        return {"kind": kind, "mode": mode, "out": str(path)}

    import requests
    import wandb

    try:
        upload(board, cfg.entity)
    except (wandb.errors.Error, requests.RequestException, ValueError) as err:
        path = write_spec(board, cfg.out)
        reason = next(iter(str(err).splitlines()), "") or type(err).__name__
        raise ConfigError(
            f"wandb did not take the {kind} ({reason}): check the key, entity= and project=; its spec "
            f"is in {path}, upload it with ld-dashboard mode=online from_spec={path}"
        ) from err
    log.info("saved the %s to the wandb project %s/%s", kind, board.entity, board.project)
    return {"kind": kind, "mode": mode, "entity": board.entity, "project": board.project}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="dashboard")
@entry_point
def main(cfg: DictConfig) -> None:
    dashboard(cfg)


if __name__ == "__main__":
    main()
