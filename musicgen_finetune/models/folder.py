"""A local model folder in the facebook/musicgen-small snapshot layout, checked before anything trains.
`check` only reads; `models.open.open_model` converts a transformers-format folder first.

    <model>/state_dict.bin              LM weights + the config it was trained with ('best_state', 'xp.cfg')
    <model>/compression_state_dict.bin  the full EnCodec ('best_state', 'xp.cfg')
    <model>/t5/ (optional)              a local T5 encoder + spiece.model (else T5=, or the Hugging Face cache)

Transformers files in the same folder (config.json, model.safetensors, ...) are ignored here.
"""

import dataclasses
import json
import os
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..patches import UnsafeCheckpointError, safe_load

LM_FILE = "state_dict.bin"
COMPRESSION_FILE = "compression_state_dict.bin"
T5_SUBDIR = "t5"
T5_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
PRETRAINED_PREFIX = "//pretrained/"


class ModelDirError(UserError, FileNotFoundError):
    """A model folder or its T5 is missing something; the message names what and how to provide it."""


@dataclasses.dataclass
class ModelFiles:
    root: Path
    lm: Path
    compression: Path
    t5: tp.Optional[Path]
    xp_cfg: DictConfig
    tensors: int
    parameters: int  # elements in the LM's best_state

    def describe(self) -> str:
        t5 = f", T5 from {self.t5}" if self.t5 else ""
        return f"{self.root}: LM {self.lm.name} ({self.tensors} tensors), EnCodec {self.compression.name}{t5}"


@dataclasses.dataclass
class StateDictReport:
    matched: int
    total: int
    missing: tp.List[str]  # in the model, not in the file: keep their initial values
    unexpected: tp.List[str]  # in the file, not in the model
    mismatched: tp.List[str]  # in both, with different shapes

    def describe(self) -> str:
        parts = []
        for label, keys in (
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
            ("missing", self.missing),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
        return "; ".join(parts) or f"all {self.total} tensors match"


def compare_state_dicts(model_state: tp.Mapping[str, tp.Any], loaded: tp.Mapping[str, tp.Any]) -> StateDictReport:
    matched = [k for k in loaded if k in model_state and tuple(loaded[k].shape) == tuple(model_state[k].shape)]
    return StateDictReport(
        matched=len(matched),
        total=len(model_state),
        missing=[k for k in model_state if k not in loaded],
        unexpected=[k for k in loaded if k not in model_state],
        mismatched=[k for k in loaded if k in model_state and k not in matched],
    )


def lm_file(name: tp.Union[str, Path]) -> Path:
    """The LM file behind a `//pretrained/<name>` reference to a folder or file."""
    path = Path(name)
    return path / LM_FILE if path.is_dir() else path


def load_package(path: Path) -> dict:
    """A snapshot file's dict, memory-mapped (no copy of the weights), with the safe unpickler."""
    try:
        package = safe_load(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except RuntimeError as err:  # not a zip-format torch file
        raise ModelDirError(f"{path} is not a readable torch file ({err}).") from err
    if not isinstance(package, dict) or "best_state" not in package:
        raise ModelDirError(
            f"{path} has no 'best_state': it is not an AudioCraft model file. A training "
            "checkpoint (checkpoint.th) must be exported first: `make export XP=<signature>`."
        )
    return package


def _hf_cache_dirs() -> tp.List[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return [home / "hub"]


def is_t5_dir(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "spiece.model").is_file()
        and any((path / w).is_file() for w in T5_WEIGHTS)
    )


def find_t5(root: Path, name: str, explicit: tp.Optional[tp.Union[str, Path]] = None) -> Path:
    """The local T5 for a model whose xp.cfg names T5 `name`: T5=, <model>/t5, a folder named so, the HF cache."""
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not is_t5_dir(path):
            raise ModelDirError(
                f"T5={path} is not a T5 folder: it needs config.json, spiece.model and "
                f"{' or '.join(T5_WEIGHTS)} (T5EncoderModel.save_pretrained + T5Tokenizer.save_pretrained)."
            )
        return path
    candidates = [root / T5_SUBDIR, root / Path(name).name, Path(name).expanduser()]
    short = name.split("/")[-1]
    for cache in _hf_cache_dirs():
        for repo in {name, f"google-t5/{short}", short}:
            snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
            candidates += sorted(snapshots.glob("*")) if snapshots.is_dir() else [snapshots]
    for path in candidates:
        if is_t5_dir(path):
            return path.resolve()
    looked = "; ".join(str(c) for c in dict.fromkeys(candidates))
    raise ModelDirError(
        f"No local copy of the T5 text encoder '{name}' that {root / LM_FILE} was trained with (looked in: "
        f"{looked}). Provide it with T5=/path/to/{short} (a folder with config.json, spiece.model and the weights), "
        f"or put it at {root / T5_SUBDIR}, or download it once where the hub is reachable: "
        f"`huggingface-cli download {name}` (then copy ~/.cache/huggingface here)."
    )


def holds_model(folder: Path) -> bool:
    """Whether `folder` holds a model MODEL= takes: the AudioCraft layout, or a transformers MusicGen (not the T5
    folder a model carries beside its weights)."""
    if (folder / LM_FILE).is_file() and (folder / COMPRESSION_FILE).is_file():
        return True
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        return str(json.loads((folder / "config.json").read_text()).get("model_type", "")).startswith("musicgen")
    except (OSError, ValueError, AttributeError):
        return False


def models_below(root: Path) -> tp.List[Path]:
    """Model folders one level below `root`, or two where the level between is a hub cache's `snapshots/<hash>`
    (so MODEL=<the hub cache's models--facebook--musicgen-small> finds its snapshot)."""
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and holds_model(child):
            found.append(child)
    snapshots = root / "snapshots"
    if snapshots.is_dir():
        found += [child for child in sorted(snapshots.iterdir()) if child.is_dir() and holds_model(child)]
    return found


def adapter_hint(root: Path) -> tp.Optional[str]:
    """The line for MODEL= given LoRA adapters (our adapters.safetensors or a PEFT folder) instead of a model."""
    if root.is_file() and root.suffix == ".safetensors" and Path(f"{root}.json").is_file():
        what = "a LoRA adapter file"
    elif root.is_dir() and (root / "adapter_config.json").is_file() and not holds_model(root):
        what = "a PEFT adapter folder"
    else:
        return None
    return (
        f"MODEL={root} is {what}, not a model: give it as ADAPTER={root}, with MODEL=<the base model it was "
        "trained on>."
    )


def check(model: tp.Union[str, Path], t5: tp.Optional[tp.Union[str, Path]] = None) -> ModelFiles:
    """Everything a fine-tune of the AudioCraft-layout folder `model` needs, or a ModelDirError naming what is
    missing and how to fix it. Only reads (weights memory-mapped)."""
    root = Path(model).expanduser().resolve()
    adapter = adapter_hint(root)
    if adapter:
        raise ModelDirError(adapter)
    if not root.is_dir():
        raise ModelDirError(
            f"MODEL={model}: {root} is not a folder. Point MODEL at a local copy of "
            "facebook/musicgen-small (state_dict.bin, compression_state_dict.bin)."
        )
    lm, compression = root / LM_FILE, root / COMPRESSION_FILE
    missing = [p for p in (lm, compression) if not p.is_file()]
    if missing:
        below = models_below(root)
        if below:
            raise ModelDirError(
                f"MODEL={root} holds no model itself, but {'models are' if len(below) > 1 else 'a model is'} in "
                f"the folder below it: {' or '.join(f'MODEL={path}' for path in below[:3])}."
            )
        hint = ""
        if (root / "model.safetensors").is_file() and (root / "config.json").is_file():
            hint = (
                " It has transformers files (config.json + model.safetensors), but not of a MusicGen "
                "(MusicgenForConditionalGeneration) that could be converted."
            )
        raise ModelDirError(
            f"MODEL={root} lacks {', '.join(p.name for p in missing)}.{hint} Download the "
            "snapshot of facebook/musicgen-small (state_dict.bin and compression_state_dict.bin) "
            "into that folder."
        )
    package = load_package(lm)
    if "xp.cfg" not in package:
        raise ModelDirError(
            f"{lm} has no 'xp.cfg': the LM's architecture cannot be known. Use an exported "
            "AudioCraft model (MusicGen snapshot or `make export`)."
        )
    xp_cfg = OmegaConf.create(package["xp.cfg"])
    compression_package = load_package(compression)
    if "pretrained" in compression_package or "xp.cfg" not in compression_package:
        raise ModelDirError(
            f"{compression} only points at '{compression_package.get('pretrained')}' instead of holding the "
            "EnCodec weights, which would need the hub. Copy the real compression_state_dict.bin of "
            "facebook/musicgen-small there."
        )
    t5_dir = None
    t5_cfg = OmegaConf.select(xp_cfg, "conditioners.description.t5")
    if OmegaConf.select(xp_cfg, "conditioners.description.model") == "t5" and t5_cfg is not None:
        t5_dir = find_t5(root, str(t5_cfg.name), t5)
    state = package["best_state"]
    return ModelFiles(
        root=root,
        lm=lm,
        compression=compression,
        t5=t5_dir,
        xp_cfg=xp_cfg,
        tensors=len(state),
        parameters=sum(t.numel() for t in state.values()),
    )
