"""Fine-tune MusicGen with AudioCraft's own solver, from a local model folder, offline.

The package is also the dora package: `dora -P musicgen_finetune run ...` finds `musicgen_finetune.train.main`.
"""
from pathlib import Path
import os

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"


def output_dir() -> Path:
    """Where experiments, exports and reports go: `$MUSICGEN_FT_OUTPUT` or `<repo>/output`, always absolute."""
    return Path(os.environ.get("MUSICGEN_FT_OUTPUT") or REPO_ROOT / "output").resolve()


def experiments_dir() -> Path:
    """Where dora keeps experiments: `$AUDIOCRAFT_DORA_DIR/xps` (the entry points set it from OUTPUT=)."""
    return Path(os.environ.get("AUDIOCRAFT_DORA_DIR") or output_dir()).resolve() / "xps"


def upstream_source_dir() -> Path:
    """The AudioCraft source tree whose `config/` we build on: `$AUDIOCRAFT_SRC` or `<repo>/audiocraft`."""
    return Path(os.environ.get("AUDIOCRAFT_SRC") or REPO_ROOT / "audiocraft").resolve()


def upstream_config_dir() -> Path:
    config = upstream_source_dir() / "config"
    if not (config / "config.yaml").is_file():
        raise FileNotFoundError(
            f"AudioCraft's config tree was not found at {config}. Run `make setup` to unpack the pinned "
            "AudioCraft 1.3.0 source there, or set AUDIOCRAFT_SRC to your own AudioCraft checkout.")
    return config
