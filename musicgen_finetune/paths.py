"""Where the harness reads and writes: every path is absolute, and each can be moved by an environment variable.

<repo>/config/          our Hydra overlay (CONFIG_DIR)
<repo>/audiocraft/      AudioCraft's source tree, unpacked by `make setup` ($AUDIOCRAFT_SRC)
<repo>/manifests/<name> datasets written by `make manifests` ($MUSICGEN_FT_MANIFESTS)
<repo>/output/          experiments, exports, samples, reports, caches ($MUSICGEN_FT_OUTPUT, make's OUTPUT=)
"""

import os
from pathlib import Path

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "config"


def output_dir() -> Path:
    """Where experiments, exports and reports go: `$MUSICGEN_FT_OUTPUT` or `<repo>/output`, always absolute."""
    return Path(os.environ.get("MUSICGEN_FT_OUTPUT") or REPO_ROOT / "output").resolve()


def experiments_dir() -> Path:
    """Where dora keeps experiments: `$AUDIOCRAFT_DORA_DIR/xps` (the environment sets it from OUTPUT=)."""
    return Path(os.environ.get("AUDIOCRAFT_DORA_DIR") or output_dir()).resolve() / "xps"


def manifests_root() -> Path:
    """Where `make manifests` writes datasets: `$MUSICGEN_FT_MANIFESTS` or `<repo>/manifests`."""
    return Path(os.environ.get("MUSICGEN_FT_MANIFESTS") or REPO_ROOT / "manifests").resolve()


def upstream_source_dir() -> Path:
    """The AudioCraft source tree whose `config/` we build on: `$AUDIOCRAFT_SRC` or `<repo>/audiocraft`."""
    return Path(os.environ.get("AUDIOCRAFT_SRC") or REPO_ROOT / "audiocraft").resolve()


class SetupError(UserError):
    """`make setup` has not been run (or AUDIOCRAFT_SRC points at the wrong folder)."""


def upstream_config_dir() -> Path:
    """AudioCraft's config tree (its PyPI wheel ships none), or SetupError saying how to get it."""
    config = upstream_source_dir() / "config"
    if not (config / "config.yaml").is_file():
        raise SetupError(
            f"AudioCraft's config tree was not found at {config}. Run `make setup` to unpack the pinned "
            "AudioCraft 1.3.0 source there, or set AUDIOCRAFT_SRC to your own AudioCraft checkout."
        )
    return config
