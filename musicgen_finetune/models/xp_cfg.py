"""The config a model was trained with (`xp.cfg` in its state_dict.bin), and the LM built from it.

to_yaml(cfg)                           the one writer of an 'xp.cfg': a yaml string, interpolations resolved
package(cfg, state, **extra)           what torch.save writes as state_dict.bin / compression_state_dict.bin
build_lm(cfg, state, device, t5)       AudioCraft's LM for a config (the T5 from a local folder), its weights
architecture_overrides(model, run)     `key=value` giving a run's config the model's architecture
"""

import typing as tp
from pathlib import Path

import torch
from audiocraft.models import builders
from omegaconf import DictConfig, OmegaConf

from .. import patches
from ..config import hydra_value, leaves

# What must match between a snapshot and the run's config for its weights to load; the rest is optimisation.
ARCHITECTURE_SECTIONS = (
    "lm_model",
    "sample_rate",
    "channels",
    "transformer_lm",
    "codebooks_pattern",
    "fuser",
    "conditioners",
)
# Keys of the architecture sections that say how to run the model, not what it is: the preset decides them.
RUNTIME_KEYS = (
    "transformer_lm.checkpointing",
    "transformer_lm.memory_efficient",
    "transformer_lm.attention_as_float32",
)
T5_NAME = "conditioners.description.t5.name"


def to_yaml(cfg: DictConfig) -> str:
    """The config as upstream stores it in 'xp.cfg': a yaml string, here with interpolations resolved, so that the
    file means the same wherever it is read."""
    return OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)))


def package(cfg: DictConfig, state: tp.Mapping[str, torch.Tensor], **extra: tp.Any) -> dict:
    """A model file's content: {'best_state': weights, 'xp.cfg': yaml, ...extra} (upstream's layout)."""
    return {"best_state": dict(state), "xp.cfg": to_yaml(cfg), **extra}


def build_lm(
    cfg: DictConfig,
    state: tp.Optional[tp.Mapping[str, torch.Tensor]] = None,
    device: str = "cpu",
    t5: tp.Optional[tp.Union[str, Path]] = None,
    strict: bool = True,
):
    """AudioCraft's LMModel for `cfg` in float32 on `device`, with `state` loaded (float32) when given.

    Args:
        cfg: a model's xp.cfg, or a run's config.
        state: LM weights by name (a model file's best_state); floating tensors are cast to float32.
        device: where to build it.
        t5: a local T5 folder for the text conditioner, replacing the name in `cfg`.
        strict: every tensor of the LM must be in `state` (False: those missing keep their initial values).
    Returns:
        The LM, in train mode as AudioCraft builds it, with the config it was built from as `lm.cfg` (as
        AudioCraft's loaders.load_lm_model leaves it).
    """
    patches.apply()  # a local T5 folder is accepted as the conditioner's name
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if t5 is not None:
        OmegaConf.update(cfg, T5_NAME, str(t5))
    cfg.device, cfg.dtype = device, "float32"
    lm = builders.get_lm_model(cfg)
    lm.cfg = cfg
    if state is not None:
        lm.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=strict)
    return lm


def architecture_sections(cfg: DictConfig) -> dict:
    """The architecture sections as plain values. Only they are resolved: a released xp.cfg also holds paths
    such as ${oc.env:USER} that need not resolve here."""
    return {
        s: OmegaConf.to_container(cfg[s], resolve=True) if OmegaConf.is_config(cfg[s]) else cfg[s]
        for s in ARCHITECTURE_SECTIONS
        if s in cfg
    }


def architecture_overrides(snapshot_cfg: DictConfig, run_cfg: DictConfig) -> tp.List[str]:
    """`key=value` overrides that give the run's config the snapshot's architecture, where they differ."""
    run_leaves = dict(leaves(architecture_sections(run_cfg), ""))
    overrides = []
    for key, value in leaves(architecture_sections(snapshot_cfg), ""):
        if key.endswith("t5.name") or key not in run_leaves or value == {} or key in RUNTIME_KEYS:
            continue  # the T5 path is set separately; keys this AudioCraft has no more are irrelevant
        if run_leaves[key] != value:
            overrides.append(f"{key}={hydra_value(value)}")
    return overrides
