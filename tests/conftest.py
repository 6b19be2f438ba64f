"""Shared fixtures: a tiny model and a synthetic 808 dataset, written once per test session into a temp folder.

Every test runs with outputs and manifests redirected there (MUSICGEN_FT_OUTPUT, MUSICGEN_FT_MANIFESTS), so the
suite never touches the repository's output/ or manifests/.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musicgen_finetune import environment

REPO = Path(__file__).resolve().parent.parent
NETWORK_GUARD = Path(__file__).resolve().parent / "network_guard"
DATASET = "hiphop808-test"
# As `make test` runs it: the venv's bin (its ffmpeg, dora) first on PATH.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
environment.prepare()  # the harness's environment (offline hub, our teams file), as every entry point sets it


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("musicgen_ft")
    os.environ["MUSICGEN_FT_OUTPUT"] = str(root / "output")
    os.environ["MUSICGEN_FT_MANIFESTS"] = str(root / "manifests")
    return root


@pytest.fixture(scope="session")
def tiny_model(workdir) -> Path:
    from musicgen_finetune.tiny_model import write_tiny_model
    return write_tiny_model(workdir / "tiny-musicgen", seed=0)


@pytest.fixture(scope="session")
def beats(workdir) -> Path:
    from musicgen_finetune.synth808 import write_dataset
    return write_dataset(workdir / "beats", count=8, seconds=3.0, seed=808)


@pytest.fixture(scope="session")
def dataset(beats) -> Path:
    """The beats cut into 1 s segments (short segments keep the end-to-end runs fast)."""
    from musicgen_finetune.data import ManifestOptions, build_manifests
    return build_manifests(beats, DATASET, ManifestOptions(segment=1.0, valid=0.25))


def run_tool(args, workdir: Path, extra_env=None, timeout=600) -> subprocess.CompletedProcess:
    """A tool of tools/ in a subprocess, as `make` runs it: no USER, no network (see network_guard/)."""
    env = {k: v for k, v in os.environ.items() if k != "USER"}
    env.update({
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        "PYTHONPATH": str(NETWORK_GUARD),
        "NETWORK_GUARD_LOG": str(workdir / "network_attempts.log"),
        "MUSICGEN_FT_OUTPUT": str(workdir / "output"),
        "MUSICGEN_FT_MANIFESTS": str(workdir / "manifests"),
        **(extra_env or {}),
    })
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
