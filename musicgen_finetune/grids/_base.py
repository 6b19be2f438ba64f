"""What every grid builds on: the overrides `make train` would use for MODEL / NAME (/ T5 / PRESET)."""

import os
import typing as tp

from ..launch import DEFAULT_PRESET, LaunchError, plan


def base_overrides(lora: bool = False) -> tp.List[str]:
    """`make train`'s overrides (model folder, dataset, architecture, preset; `<PRESET>_lora` for LoRA)."""
    model, name = os.environ.get("MODEL"), os.environ.get("NAME")
    if not model or not name:
        raise LaunchError(
            "A grid fine-tunes MODEL on dataset NAME: set both, e.g. "
            "`make grid GRID=full_vs_lora MODEL=/path/to/musicgen-small NAME=my808`."
        )
    preset = os.environ.get("PRESET") or DEFAULT_PRESET
    # no device check here: `dora grid` lists experiments on a login node; they run on GPU nodes
    overrides, _ = plan(
        model, name, os.environ.get("T5") or None, preset + "_lora" if lora else preset, device_check=False
    )
    return overrides
