"""Compose the harness's Hydra config outside of dora (for tools that need to read it before a run)."""
import typing as tp

from omegaconf import DictConfig

from . import CONFIG_DIR, environment

PRIMARY_CONFIG = "musicgen_finetune"


def compose(overrides: tp.Sequence[str] = ()) -> DictConfig:
    """The config `dora -P musicgen_finetune run <overrides>` would run with."""
    environment.prepare()
    from hydra import compose as hydra_compose, initialize_config_dir
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.1", job_name=PRIMARY_CONFIG):
        return hydra_compose(PRIMARY_CONFIG, overrides=list(overrides))
