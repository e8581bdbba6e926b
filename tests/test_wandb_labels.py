"""wandb runs carry a group, tags and the resolved config, so dashboards can group by family, data
size and sampler; a group or tags given on the command line win."""

from __future__ import annotations

from conftest import compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_diff.loggers import fill_wandb_labels, run_labels


def labels(overrides):
    return run_labels(compose_train(overrides, tiny=False))


def test_default_labels_name_family_data_size_and_sampler():
    assert labels(["data=digits", "model=ddpm", "data.num_train=128"]) == {
        "group": "digits-DDPM",
        "tags": ["DDPM", "digits", "num_train=128", "sampler=heun"],
    }
    assert labels(["data=moons", "model=score_sde", "sampler=teleport_heun"]) == {
        "group": "twomoons-ScoreSDE",
        "tags": ["ScoreSDE", "twomoons", "num_train=full", "sampler=teleport_heun"],
    }
    assert labels(["data=cifar10", "model=gaussian", "sampler=euler_maruyama"])["tags"] == [
        "gaussian",
        "cifar10",
        "num_train=full",
        "sampler=euler_maruyama",
    ]


def test_user_group_and_tags_win():
    cfg = compose_train(["logger=wandb", "logger.wandb.group=mine", "logger.wandb.tags=[a,b]"], tiny=False)
    fill_wandb_labels(cfg)
    assert cfg.logger.wandb.group == "mine"
    assert list(cfg.logger.wandb.tags) == ["a", "b"]
    cfg = compose_train(["logger=wandb", "logger.wandb.tags=[a]"], tiny=False)
    fill_wandb_labels(cfg)
    assert cfg.logger.wandb.group == "digits-DDPM" and list(cfg.logger.wandb.tags) == ["a"]


def test_no_wandb_logger_leaves_config_alone():
    cfg = compose_train(["logger=csv"], tiny=False)
    before = OmegaConf.to_yaml(cfg)
    fill_wandb_labels(cfg)
    assert OmegaConf.to_yaml(cfg) == before


def test_offline_wandb_run_has_group_tags_and_config(tmp_path):
    cfg = compose_train(
        ["logger=wandb", "logger.wandb.mode=offline", "data=moons", "data.num_train=32"], run_dir=tmp_path
    )
    fill_wandb_labels(cfg)
    logger = instantiate(cfg.logger.wandb)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger.log_hyperparams(resolved)
    run = logger.experiment
    try:
        assert run.group == "twomoons-DDPM"
        assert set(run.tags) == {"DDPM", "twomoons", "num_train=32", "sampler=heun"}
        assert run.config["data"]["num_train"] == 32
        assert run.config["model"]["_target_"] == "lightning_diff.models.DDPM"
        assert run.config["logger"]["wandb"]["group"] == "twomoons-DDPM"
    finally:
        run.finish()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run.id}"))
