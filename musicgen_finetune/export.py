"""`make export`: from a dora experiment to a model folder in the facebook/musicgen-small layout.

    <out>/state_dict.bin               {'best_state', 'xp.cfg' (yaml), 'version', 'exported'}: AudioCraft's format
    <out>/compression_state_dict.bin   the base model's own file, copied (never a pointer to a hub name)
    <out>/adapters.safetensors(.json)  LoRA runs: the adapters alone (the state_dict.bin holds them merged)
    <out>/peft/                        LoRA runs: the same adapters for transformers + PEFT (models/hf/peft_lora.py)
    <out>/export.json, README.md       base model, dataset, LoRA settings, epoch, validation loss
    <out>/history.json                 the run's history (losses per epoch), for reports made from the export

The T5 text encoder is referenced, not copied: xp.cfg names the local folder the run used, and `load()` looks
for it there, then beside the model (`t5/`), then in the Hugging Face cache.
"""

import json
import shutil
import typing as tp
from pathlib import Path

import torch
from omegaconf import OmegaConf

import audiocraft

from . import checkpoints, lora
from .errors import UserError
from .experiments import HISTORY_FILE, find_experiment, run_choice, valid_value
from .files import replaced_when_complete
from .models import folder as model_dir
from .models import xp_cfg
from .models.hf import peft_lora
from .patches import safe_load
from .paths import output_dir

WHICH = ("best", "last")


class ExportError(UserError, ValueError):
    """The experiment cannot be exported; the message says why and what to do."""


def base_folder(cfg) -> Path:
    prefix = model_dir.PRETRAINED_PREFIX
    name = str(cfg.get("continue_from") or "")
    if not name.startswith(prefix):
        raise ExportError(
            f"The experiment did not start from a local model folder (continue_from={name!r}); "
            "its compression model cannot be copied."
        )
    folder = Path(name[len(prefix) :])
    if not (folder / model_dir.COMPRESSION_FILE).is_file():
        raise ExportError(
            f"The experiment's base model {folder} is gone (no {model_dir.COMPRESSION_FILE}): put it "
            "back where it was trained from; the export copies its compression model."
        )
    return folder


def merged_lora_state(cfg, checkpoint: dict, which: str, base: dict, out: Path) -> dict:
    """Base + adapters: write the adapters file, return the merged weights (base keys only)."""
    config = lora.LoraConfig.from_dict(checkpoint["lora"]["config"])
    adapters = checkpoint["best_state"]["model"] if which == "best" else checkpoint["model"]
    lm = xp_cfg.build_lm(cfg)
    lora.inject(lm, config)
    missing, unexpected = lm.load_state_dict({**base, **adapters}, strict=False)
    if unexpected or [k for k in missing if not k.startswith("condition_provider.conditioners.description.t5")]:
        raise ExportError(
            f"The checkpoint's adapters do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}."
        )
    lora.save_adapters(lm, out / "adapters.safetensors", config, base_hash=checkpoint["lora"]["hash"])
    lora.merge(lm)
    return {k: v for k, v in lm.state_dict().items() if not lora.is_adapter_key(k)}


def write_peft_folder(staging: Path, out: Path, base_dir: Path, base_hash: str) -> tp.Optional[str]:
    """<export>/peft/: the adapters as a PEFT LoRA folder on the transformers form of the base (found, or converted
    once). None when written, else why not: printed, and the rest of the export stands."""
    try:
        hf_base, users_own = peft_lora.transformers_base(base_dir, base_hash)
        if not users_own:  # <export>/transformers-base/, which peft/ names as ../transformers-base
            hf_base = peft_lora.place_beside(hf_base, staging / "peft", base_hash)
        config, metadata, tensors = lora.read_adapters(staging / "adapters.safetensors")
        (staging / "peft").mkdir()
        peft_lora.write_peft(
            staging / "peft",
            config,
            tensors,
            metadata["adapted"],
            base_hash,
            hf_base,
            str(out / "adapters.safetensors"),
        )
        return None
    except UserError as err:
        shutil.rmtree(staging / "peft", ignore_errors=True)
        shutil.rmtree(staging / peft_lora.BESIDE_BASE, ignore_errors=True)
        print(f"peft/ not written (the rest of the export is): {err}", flush=True)
        return str(err)


def export(xp: str, out: tp.Optional[tp.Union[str, Path]] = None, which: str = "best") -> Path:
    """`make export`: the experiment `xp` (signature or folder) as a model folder at `out` (default
    <output>/exports/<sig>-<which>), its best state (lowest validation loss) or its last; returns the folder."""
    if which not in WHICH:
        raise ExportError(f"WHICH={which!r}: use best (lowest validation loss) or last.")
    folder = find_experiment(xp)
    checkpoint = safe_load(folder / "checkpoint.th", mmap=True)  # a full checkpoint is ~5 GB: map, don't copy
    cfg = checkpoint["xp.cfg"]
    if which == "best":  # a lean checkpoint refers to its best state (checkpoints.py)
        checkpoint["best_state"] = checkpoints.resolve_best_state(folder, checkpoint)
    base_dir = base_folder(cfg)
    out = Path(out).expanduser().resolve() if out else output_dir() / "exports" / f"{folder.name}-{which}"
    base_package = safe_load(base_dir / model_dir.LM_FILE)
    with replaced_when_complete(out) as staging:
        if "lora" in checkpoint:
            base = base_package["best_state"]
            base_hash = lora.base_model_hash(base)
            if base_hash != checkpoint["lora"]["hash"]:
                raise ExportError(
                    f"{base_dir / model_dir.LM_FILE} changed since the adapters were trained (hash "
                    f"{base_hash[:16]}, expected {checkpoint['lora']['hash'][:16]})."
                )
            state = merged_lora_state(cfg, checkpoint, which, {k: v.float() for k, v in base.items()}, staging)
            peft_skipped = write_peft_folder(staging, out, base_dir, base_hash)
        else:
            state = checkpoint["best_state"]["model"] if which == "best" else checkpoint["model"]
        torch.save(
            xp_cfg.package(cfg, state, version=audiocraft.__version__, exported=True), staging / model_dir.LM_FILE
        )
        shutil.copyfile(base_dir / model_dir.COMPRESSION_FILE, staging / model_dir.COMPRESSION_FILE)
        history = checkpoint.get("history") or []
        choice = run_choice(cfg, history)  # the run's early_stop.metric and forgetting budget
        epoch = choice.epoch if which == "best" else len(history)
        (staging / HISTORY_FILE).write_text(json.dumps(history, indent=2) + "\n")
        info = {
            "experiment": folder.name,
            "which": which,
            "epoch": epoch,
            "epochs_trained": len(history),
            "why": choice.reason if which == "best" else "the last epoch trained",
            "valid_ce": valid_value(history, epoch),
            "prior_ce": valid_value(history, epoch, "prior_ce"),
            "prior_ce_base": valid_value(history, epoch, "prior_ce_base"),
            "base_model": str(base_dir),
            "t5": str(OmegaConf.select(cfg, "conditioners.description.t5.name")),
            "dataset": str(OmegaConf.select(cfg, "datasource.train")),
            "segment_duration": OmegaConf.select(cfg, "dataset.segment_duration"),
            "lora": checkpoint["lora"]["config"] if "lora" in checkpoint else None,
        }
        if "lora" in checkpoint:
            info["peft"] = {"folder": "peft"} if peft_skipped is None else {"skipped": peft_skipped}
        (staging / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        (staging / "README.md").write_text(
            f"# Fine-tuned MusicGen ({folder.name}, {which} state)\n\n"
            f"Fine-tuned from {base_dir} on {info['dataset']}, epoch {epoch} of {len(history)}, "
            f"validation cross-entropy {info['valid_ce']}.\n"
            + (
                f"LoRA rank {info['lora']['rank']}, alpha {info['lora']['alpha']}, targets "
                f"{', '.join(info['lora']['targets'])}: merged into state_dict.bin, alone in "
                "adapters.safetensors, and "
                + (
                    "for transformers + PEFT in peft/ (its README says how).\n"
                    if peft_skipped is None
                    else f"not for PEFT ({peft_skipped}).\n"
                )
                if info["lora"]
                else ""
            )
            + '\nLoad it with `musicgen_finetune.generate.load("<this folder>")` or `make generate MODEL=<this '
            "folder>`; it has the musicgen-small layout (state_dict.bin + compression_state_dict.bin).\n"
        )
    return out
