"""Opening a model folder given as MODEL=: a transformers-format MusicGen is converted once to AudioCraft's layout
(cached under <output>/hf_cache/), then the folder is checked (`folder.check`, which only reads)."""

import typing as tp
from pathlib import Path

from .folder import ModelDirError, ModelFiles, check
from .hf.convert import ensure_audiocraft_layout
from .hf.mapping import ConversionError


def open_model(model: tp.Union[str, Path], t5: tp.Optional[tp.Union[str, Path]] = None) -> ModelFiles:
    """The files of `model` (AudioCraft layout, or transformers converted once), checked; ModelDirError naming
    what is missing and how to fix it."""
    try:
        root = ensure_audiocraft_layout(model)
    except ConversionError as err:
        raise ModelDirError(f"MODEL={model} looks like a transformers model that cannot be converted: {err}") from err
    return check(root, t5)
