"""Run-time patches of AudioCraft 1.3.0, each answering one upstream behaviour (file and line in the 1.3.0 sdist).

`apply()` is idempotent and is called by every entry point that builds AudioCraft objects. Each patch is tested
in tests/test_patches.py against the upstream behaviour it answers.
"""

import functools
import json
import os
import pickle
import sys
import types
import typing as tp
from pathlib import Path

from .errors import UserError


class UnsafeCheckpointError(UserError, RuntimeError):
    """A file needs arbitrary code to unpickle; it was refused."""


class UnreadableCheckpointError(UserError, ValueError):
    """A file is not a readable torch file (truncated, corrupt, another format)."""


def t5_width(t5_dir: tp.Union[str, Path]) -> int:
    """Width (d_model) of the T5 encoder saved in `t5_dir`, from its config.json."""
    config = Path(t5_dir) / "config.json"
    try:
        return int(json.loads(config.read_text())["d_model"])
    except (OSError, ValueError, KeyError) as err:
        raise FileNotFoundError(
            f"{config} is missing or has no d_model ({err}); a T5 folder is what "
            "T5EncoderModel.save_pretrained writes (config.json, model weights, spiece.model)."
        ) from err


def accept_local_t5_dirs() -> None:
    """modules/conditioners.py:393 asserts the T5 name is one of 10 hub ids (MODELS, :374) and reads its width
    from MODELS_DIMS (:377). A local T5 folder is accepted here: registered under its path, width from config.json.
    """
    from audiocraft.modules.conditioners import T5Conditioner

    if getattr(T5Conditioner.__init__, "_musicgen_ft_patched", False):
        return
    upstream_init = T5Conditioner.__init__

    @functools.wraps(upstream_init)
    def __init__(self, name: str, *args, **kwargs):
        if os.path.isdir(name) and name not in T5Conditioner.MODELS_DIMS:
            T5Conditioner.MODELS.append(name)
            T5Conditioner.MODELS_DIMS[name] = t5_width(name)
        upstream_init(self, name, *args, **kwargs)

    __init__._musicgen_ft_patched = True  # type: ignore[attr-defined]
    T5Conditioner.__init__ = __init__


def _checkpoint_globals() -> tp.List[tp.Any]:
    """What AudioCraft's checkpoints pickle besides tensors: the Hydra config (omegaconf) in 'xp.cfg'."""
    import collections

    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode, ValueNode

    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        AnyNode,
        BooleanNode,
        FloatNode,
        IntegerNode,
        StringNode,
        ValueNode,
        tp.Any,
        dict,
        list,
        int,
        float,
        str,
        collections.defaultdict,
    ]


# What torch's weights-only unpickler says when a file names a Python object to call (code to run) rather than
# data; anything else it refuses (an unknown opcode: garbage) or torch cannot read (a truncated zip) is a damaged file.
UNSAFE_MARKERS = ("Unsupported global", "unsupported GLOBAL")
# torch.load's errors for a file that is not (or no longer) a whole torch file.
UNREADABLE = (pickle.UnpicklingError, EOFError, RuntimeError)


def refused(path: tp.Union[str, Path], err: Exception) -> Exception:
    """The error for a file torch could not load safely, naming the file and what to do: unsafe (it would run
    code) or unreadable (truncated, corrupt, not a torch file)."""
    text = str(err)
    unsafe = [line.strip() for line in text.splitlines() if any(marker in line for marker in UNSAFE_MARKERS)]
    if not unsafe:
        detail = (text.strip().splitlines() or [type(err).__name__])[0][:120]
        return UnreadableCheckpointError(
            f"{path} is not a readable torch file, it may be truncated or corrupt ({detail}); copy or export it again."
        )
    return UnsafeCheckpointError(
        f"{path} needs arbitrary code to unpickle, so it was not loaded ({unsafe[0]}). Only AudioCraft files "
        "(tensors and their omegaconf config) load here; re-export the model with this harness (`make export`) "
        "or re-save its state_dict with torch.save."
    )


def is_damaged_file_error(err: RuntimeError) -> bool:
    """torch.load's RuntimeError for a file that is not a whole zip archive (truncated, another format)."""
    return "PytorchStreamReader" in str(err) or "zip archive" in str(err)


def safe_load(path: tp.Union[str, Path], map_location: tp.Any = "cpu", mmap: bool = False) -> tp.Any:
    """torch.load with the safe (weights-only) unpickler and our allow-list, naming the file if it refuses it."""
    import torch

    torch.serialization.add_safe_globals(_checkpoint_globals())
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except UNREADABLE as err:
        if isinstance(err, RuntimeError) and not is_damaged_file_error(err):
            raise
        raise refused(path, err) from err


def safe_checkpoint_loading() -> None:
    """torch >= 2.6 loads weights-only by default, so utils/checkpoint.py:93 fails on every `checkpoint.th`
    ("Unsupported global": the pickled DictConfig in 'xp.cfg'). Allow-list the omegaconf types instead of
    turning the safe loader off, and give the two loaders of user-supplied files (utils/checkpoint.py:87
    `load_checkpoint`, models/loaders.py:35 `_get_state_dict`) an error that names the file.
    """
    import torch
    from audiocraft.models import loaders
    from audiocraft.utils import checkpoint

    torch.serialization.add_safe_globals(_checkpoint_globals())
    if getattr(checkpoint.load_checkpoint, "_musicgen_ft_patched", False):
        return
    upstream_load_checkpoint = checkpoint.load_checkpoint
    upstream_get_state_dict = loaders._get_state_dict

    @functools.wraps(upstream_load_checkpoint)
    def load_checkpoint(checkpoint_path, is_sharded=False):
        try:
            return upstream_load_checkpoint(checkpoint_path, is_sharded)
        except UNREADABLE as err:
            if isinstance(err, RuntimeError) and not is_damaged_file_error(err):
                raise
            raise refused(checkpoint_path, err) from err

    @functools.wraps(upstream_get_state_dict)
    def _get_state_dict(file_or_url_or_id, filename=None, device="cpu", cache_dir=None):
        try:
            return upstream_get_state_dict(file_or_url_or_id, filename, device, cache_dir)
        except UNREADABLE as err:
            if isinstance(err, RuntimeError) and not is_damaged_file_error(err):
                raise
            path = Path(file_or_url_or_id)
            raise refused(path / filename if path.is_dir() and filename else path, err) from err

    load_checkpoint._musicgen_ft_patched = True  # type: ignore[attr-defined]
    checkpoint.load_checkpoint = load_checkpoint
    loaders._get_state_dict = _get_state_dict


def register_train_module(module: types.ModuleType) -> None:
    """utils/checkpoint.py:68, solvers/base.py:613 and solvers/musicgen.py:81 do `from audiocraft import train`,
    whose import fails outside a source checkout (its @hydra_main needs ../config). Our entry stands in for it.
    """
    import audiocraft

    sys.modules["audiocraft.train"] = module
    audiocraft.train = module  # type: ignore[attr-defined]


def apply() -> None:
    """Every patch, once per process (idempotent): entry points and model builders call it before building
    AudioCraft objects."""
    accept_local_t5_dirs()
    safe_checkpoint_loading()
