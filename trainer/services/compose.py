"""The composed, checked `Config` for a list of `key=value` overrides, by Hydra's compose API:
what `trainer.tune` (and tests, notebooks) build a run from, without `hydra.main`'s output
folders and working-directory change."""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from trainer.config import Config, from_dict, validate
from trainer.config.overrides import CONFIG_DIR, check_overrides, prepare_overrides

ConfigStore.instance().store(name="stablegan_schema", node=Config)


def to_config(dcfg: DictConfig) -> Config:
    """Hydra's composed config -> checked typed `Config`."""
    data = OmegaConf.to_container(dcfg, resolve=True)
    assert isinstance(data, dict)
    return validate(from_dict(data))


def compose(overrides: list[str]) -> Config:
    """The checked `Config` for `overrides`, composed as `python -m trainer.main` composes it."""
    check_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=prepare_overrides(overrides)))
