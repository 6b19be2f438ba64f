"""The harness's Hydra config (config/ over AudioCraft's tree) outside of dora, and writing values as overrides.

    compose(overrides)     the config `dora -P musicgen_finetune run <overrides>` would run with
    hydra_value(value)     a Python value written as a command-line override value
    leaves(nested)         (dotted key, value) for every leaf of nested dicts
"""
import typing as tp

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from .paths import CONFIG_DIR

PRIMARY_CONFIG = "musicgen_finetune"


def compose(overrides: tp.Sequence[str] = ()) -> DictConfig:
    """The config `dora -P musicgen_finetune run <overrides>` would run with."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.1", job_name=PRIMARY_CONFIG):
        return hydra_compose(PRIMARY_CONFIG, overrides=list(overrides))


def leaves(value: tp.Any, prefix: str = "") -> tp.Iterator[tp.Tuple[str, tp.Any]]:
    """(dotted key, value) for every leaf of nested dicts."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaves(child, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def hydra_value(value: tp.Any) -> str:
    """A Python value written as a Hydra command-line override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "-_./" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
