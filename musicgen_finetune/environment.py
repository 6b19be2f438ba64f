"""The process environment, set before dora, Hydra, AudioCraft or transformers are imported.

Each of these libraries reads its settings from the environment when it is imported, so the package's
`__init__` calls `prepare()` before any of its modules can import them; this module imports none of them itself
(Hydra only, inside `prepare`, for the search-path plugin).
"""

import getpass
import os
import sys

from .paths import CONFIG_DIR, output_dir, upstream_config_dir

TEAM = "musicgen_finetune"


def offline_hub() -> None:
    """Never reach the Hugging Face hub: without this, a missing T5 retries the network for minutes.

    `MUSICGEN_FT_ALLOW_HUB=1` keeps the hub reachable for users who want AudioCraft's default downloads.
    """
    if os.environ.get("MUSICGEN_FT_ALLOW_HUB") == "1":
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:  # imported before us: its constants were read already
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def user_name() -> None:
    """Upstream's teams files and config.yaml interpolate ${oc.env:USER}; containers and CI often lack it."""
    if not os.environ.get("USER"):
        try:
            os.environ["USER"] = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for this uid
            os.environ["USER"] = "musicgen"


def audiocraft_team() -> None:
    """Our teams file (dora directory, cluster partitions) instead of upstream's, which points at /checkpoint."""
    os.environ.setdefault("AUDIOCRAFT_TEAM", TEAM)
    os.environ.setdefault("AUDIOCRAFT_CONFIG", str(CONFIG_DIR / "teams" / f"{TEAM}.yaml"))
    if os.environ.get("MUSICGEN_FT_OUTPUT"):  # OUTPUT= moves everything, experiments included
        os.environ["AUDIOCRAFT_DORA_DIR"] = str(output_dir())
    os.environ.setdefault("AUDIOCRAFT_DORA_DIR", str(output_dir()))  # dora puts each experiment in xps/<sig>


def register_upstream_config() -> None:
    """Make AudioCraft's config tree a Hydra search path below ours, through a plugin.

    A `hydra.searchpath` entry in our primary config is not enough: dora lists config groups from the primary
    directory only, so `solver=` and `dset=` overrides of upstream groups would fail.
    """
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class AudioCraftConfigSearchPath(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            # looked up when Hydra composes, so that importing the package works before `make setup` ran
            search_path.append(provider="audiocraft", path=f"file://{upstream_config_dir()}")

    Plugins.instance().register(AudioCraftConfigSearchPath)


_prepared = False


def prepare() -> None:
    """Idempotent; the package's `__init__` calls it, so it runs before any of our modules imports dora, Hydra's
    compose, AudioCraft or transformers."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    offline_hub()
    user_name()
    audiocraft_team()
    register_upstream_config()
