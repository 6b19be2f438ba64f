"""Shared fixtures: a tiny model, a synthetic 808 dataset and the tiny training runs, made once per session.

Every test runs with outputs, manifests and dora experiments redirected to a temp folder (MUSICGEN_FT_OUTPUT,
MUSICGEN_FT_MANIFESTS, AUDIOCRAFT_DORA_DIR), so the suite never touches the repository's output/ or manifests/.
"""

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from musicgen_finetune import environment

REPO = Path(__file__).resolve().parent.parent
PROCESS_HOOKS = Path(__file__).resolve().parent / "process_hooks"
DATASET = "hiphop808-test"
# As `make test` runs it: the venv's bin (its ffmpeg, dora) first on PATH.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
# Outputs, manifests and dora experiments of the whole session go to a temp folder, set before anything reads them.
WORKDIR = Path(tempfile.mkdtemp(prefix="musicgen_ft_tests_"))
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)
os.environ["MUSICGEN_FT_OUTPUT"] = str(WORKDIR / "output")
os.environ["MUSICGEN_FT_MANIFESTS"] = str(WORKDIR / "manifests")
os.environ["AUDIOCRAFT_DORA_DIR"] = str(WORKDIR / "output")
# One share of the cores per test process (pytest-xdist runs TEST_WORKERS of them), for torch here and in every
# process a test starts (process_hooks/sitecustomize.py caps the solver's num_threads too): more threads than
# cores makes torch's OpenMP threads spin-wait on each other, many times the CPU time for the same work.
# MUSICGEN_FT_TEST_THREADS, when set, decides (make mutate runs a test process per core of its own).
THREADS = int(
    os.environ.get("MUSICGEN_FT_TEST_THREADS")
    or max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
)
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MUSICGEN_FT_TEST_THREADS"):
    os.environ[variable] = str(THREADS)
environment.prepare()  # the harness's environment (offline hub, our teams file), as every entry point sets it


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    import torch

    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def workdir() -> Path:
    return WORKDIR


@pytest.fixture(scope="session")
def tiny_model(workdir) -> Path:
    from musicgen_finetune.models.tiny import write_tiny_model

    return write_tiny_model(workdir / "tiny-musicgen", seed=0)


@pytest.fixture(scope="session")
def real_corpus(tmp_path_factory) -> dict:
    """Beats built from real recordings (tests/real_audio.py), once per session: name -> (Clip, wav path). Skipped
    where Debian's packages are absent, failed instead under REQUIRE_REAL_AUDIO=1 (CI)."""
    import real_audio

    real_audio.skip_or_fail(pytest)
    return real_audio.build(tmp_path_factory.getbasetemp() / "real_audio")


@pytest.fixture(scope="session")
def beats(workdir) -> Path:
    from musicgen_finetune.data.synthetic import write_dataset

    return write_dataset(workdir / "beats", count=8, seconds=3.0, seed=808)


@pytest.fixture(scope="session")
def dataset(beats) -> Path:
    """The beats cut into 1 s segments (short segments keep the end-to-end runs fast)."""
    from musicgen_finetune.data.manifests import ManifestOptions, build_manifests

    return build_manifests(beats, DATASET, ManifestOptions(segment=1.0, valid=0.25))


def run_tool(args, workdir: Path, extra_env=None, timeout=600) -> subprocess.CompletedProcess:
    """A tool of tools/ in a subprocess, as `make` runs it: no USER, no network (see process_hooks/)."""
    env = tool_env(workdir, extra_env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tool_env(workdir: Path, extra_env=None) -> dict:
    """The environment `run_tool` gives a tool."""
    env = {k: v for k, v in os.environ.items() if k != "USER"}
    env.update(
        {
            "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
            # the network guard, then this checkout's package (not whichever one the venv was set up from)
            "PYTHONPATH": os.pathsep.join([str(PROCESS_HOOKS), str(REPO)]),
            "NETWORK_GUARD_LOG": str(workdir / "network_attempts.log"),
            "MUSICGEN_FT_OUTPUT": str(workdir / "output"),
            "MUSICGEN_FT_MANIFESTS": str(workdir / "manifests"),
            "AUDIOCRAFT_DORA_DIR": str(workdir / "output"),
            **(extra_env or {}),
        }
    )
    return env


TRAIN = "tools/train.py"


def train(workdir, model, args="", preset="finetune/cpu_tiny"):
    return run_tool([TRAIN, "--model", str(model), "--name", DATASET, "--preset", preset, "--args", args], workdir)


def one_error_line(stderr: str) -> str:
    """The one `error: ...` line a tool prints for a mistake a user can make (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def xp_folder(result) -> Path:
    match = re.search(r"^Experiment (\w+): (\S+)$", result.stdout, re.MULTILINE)
    assert match, f"no experiment line in the output:\n{result.stdout}\n{result.stderr[-3000:]}"
    return Path(match.group(2))


@pytest.fixture(scope="session")
def first_run(workdir, tiny_model, dataset):
    log = workdir / "network_attempts.log"
    log.unlink(missing_ok=True)
    result = train(workdir, tiny_model)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


KILLED_AT = "train:2:1"  # mid-epoch 2, before its second update: past epoch 1's checkpoint, not yet at epoch 2's


@pytest.fixture(scope="session")
def resumed_run(workdir, tiny_model, dataset):
    """first_run's command (cpu_tiny, 3 epochs) in an output folder of its own, killed with SIGKILL at KILLED_AT
    and re-run to the end by the same command: (experiment folder, the killed run, the resumed run). test_resume
    compares it with first_run; test_watch reads its TensorBoard files and log."""
    import signal

    out = workdir / "resumed-output"
    env = {"MUSICGEN_FT_OUTPUT": str(out), "AUDIOCRAFT_DORA_DIR": str(out)}
    command = [TRAIN, "--model", str(tiny_model), "--name", DATASET, "--preset", "finetune/cpu_tiny"]
    killed = run_tool(command, workdir, extra_env={**env, "MUSICGEN_FT_TEST_KILL_AT": KILLED_AT})
    assert killed.returncode == -signal.SIGKILL, f"not killed at {KILLED_AT}: {killed.stderr[-3000:]}"
    resumed = run_tool(command, workdir, extra_env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return xp_folder(resumed), killed, resumed


@pytest.fixture(scope="session")
def lora_model(tiny_model, tmp_path_factory):
    """A copy of the tiny model, so that one test can change its weights under a LoRA experiment."""
    import shutil

    model = tmp_path_factory.mktemp("lora") / "tiny-musicgen"
    shutil.copytree(tiny_model, model)
    return model


@pytest.fixture(scope="session")
def lora_run(workdir, lora_model, dataset):
    result = train(workdir, lora_model, preset="finetune/cpu_tiny_lora")
    assert result.returncode == 0, result.stderr[-5000:]
    return result


@pytest.fixture(scope="session")
def snapshot(tiny_model):
    """The tiny model's LM config (T5 pointed at its folder) and its fp16 best_state (the LoRA and prior tests
    build LMs from it)."""
    import torch
    from omegaconf import OmegaConf

    package = torch.load(tiny_model / "state_dict.bin", weights_only=True)
    cfg = OmegaConf.create(package["xp.cfg"])
    cfg.conditioners.description.t5.name = str(tiny_model / "t5")
    cfg.device = "cpu"
    return cfg, package["best_state"]


# -- `-m "not subprocess"`: the in-process tests (make mutate) --------------------------------------------------
# A mutant exists only in the process mutmut forks for it, so a test that trains, exports or runs a tool in a child
# process cannot see it, and takes minutes. Such a test, or one using a fixture that does (first_run, worse_run,
# ...), calls one of these names; it is marked `subprocess` from its code, so new tests are sorted without a label.
# `real_audio`: the corpus of real recordings, rendered by fluidsynth and sox in child processes.
SUBPROCESS_NAMES = {"run_tool", "train", "subprocess", "real_audio"}


def _calls_a_subprocess(code) -> bool:
    if SUBPROCESS_NAMES & set(code.co_names):
        return True
    return any(_calls_a_subprocess(const) for const in code.co_consts if hasattr(const, "co_names"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        functions = [getattr(item, "function", None)] + [
            definition.func for definitions in item._fixtureinfo.name2fixturedefs.values() for definition in definitions
        ]
        if any(_calls_a_subprocess(f.__code__) for f in functions if hasattr(f, "__code__")):
            item.add_marker(pytest.mark.subprocess)
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


# -- the order make test hands the files out in (pytest-xdist --dist loadfile --no-loadscope-reorder) -------------
# Longest first, so that the longest file does not start last with the other process idle: each file's time in one
# run of the fast suite (`make test PYTEST_ARGS=--durations=0`, 2 cores). The rest follow in their usual order.
SLOWEST_FIRST = [
    "test_evaluate.py",  # a codec trained on two styles, a base trained on one, fine-tuned on the other, compared
    "test_train_e2e.py",
    "test_prior.py",
    "test_peft.py",
    "test_user_errors.py",
    "test_export_generate.py",
    "test_watch.py",
    "test_hf_bridge.py",
    "test_planning.py",
    "test_caches.py",
    "test_checkpoints.py",
]
