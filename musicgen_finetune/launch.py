"""`make train`: check the model folder, the dataset and every override, build the `dora run` command, run it, say
where things are. Nothing is created before every check has passed.

The command is printed in full, so it can be re-run or edited by hand; running it again resumes the experiment
(same overrides, same signature, same folder).
"""

import os
import shlex
import subprocess
import sys
import typing as tp
from pathlib import Path

import torch
from dora.__main__ import main as dora_main
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .cli import USER_ERROR_STATUS
from .config import OverrideError, check_override_keys, check_values, hydra_value
from .data.dataset import PreparedDataset
from .errors import UserError
from .experiments import CHECKPOINT_FILE, LOG_FILE, RunLock, read_done
from .lora import LoraConfig, check_continuable
from .models import folder as model_dir
from .models import xp_cfg
from .models.hf.peft_lora import read_adapter
from .models.open import open_model
from .paths import CONFIG_DIR, upstream_config_dir
from .planning.fit import check_fits, is_auto
from .prior import read_prompts_file
from .train import main

DEFAULT_PRESET = "finetune/musicgen_small"


class LaunchError(UserError, ValueError):
    """Something to fix before training can start; the message says what."""


def dataset_overrides(name: str, files: model_dir.ModelFiles) -> tp.List[str]:
    """The overrides in manifests/<name>/dset.yaml (data paths, segment length, padding), checked against the
    model's sample rate and channels."""
    dataset = PreparedDataset(name)
    wanted = (files.xp_cfg.get("sample_rate"), files.xp_cfg.get("channels"))
    if (dataset.sample_rate, dataset.channels) != wanted:
        raise LaunchError(
            f"NAME={name} was converted to {dataset.sample_rate} Hz, {dataset.channels} channel(s), but "
            f"{files.lm} expects {wanted[0]} Hz, {wanted[1]}: run `make manifests ... NAME={name} "
            f"MODEL={files.root}`."
        )
    return dataset.overrides()


def preservation_overrides(
    prior: bool = False, prior_prompts: tp.Optional[str] = None, general: tp.Optional[str] = None
) -> tp.List[str]:
    """`make train PRIOR=1 [PRIOR_PROMPTS=<file>] [GENERAL=<dataset>]` as overrides: prior preservation on, the
    file's prompts written into the override (so that they are in the experiment's signature, not only its path),
    and the general dataset to replay (checked to exist)."""
    overrides = ["prior.enabled=true"] if prior else []
    if prior_prompts:
        overrides.append(f"prior.prompts={hydra_value(read_prompts_file(prior_prompts))}")
    if general:
        PreparedDataset(general, "GENERAL")
        overrides.append(f"replay.dataset={hydra_value(general)}")
    return overrides


def pretrained_overrides(files: model_dir.ModelFiles) -> tp.List[str]:
    """Continue from the local LM, use its EnCodec and its T5: no hub call."""
    pretrained = hydra_value(f"{model_dir.PRETRAINED_PREFIX}{files.root}")
    overrides = [f"continue_from={pretrained}", f"compression_model_checkpoint={pretrained}"]
    if files.t5 is not None:
        overrides.append(f"conditioners.description.t5.name={hydra_value(str(files.t5))}")
    return overrides


def processes_of(gpus: tp.Union[int, str]) -> int:
    """GPUS= as a number of training processes: N, or `all` for every visible GPU. On a machine without GPUs, N
    processes train on the CPU (gloo), which is how the multi-process path is tested."""
    if str(gpus).strip().lower() == "all":
        count = torch.cuda.device_count()
        if not count:
            raise LaunchError(
                "GPUS=all: no GPU is visible. Give a number instead: GPUS=2 trains with 2 processes "
                "on the CPU (slow, but the same multi-process path)."
            )
        return count
    try:
        count = int(gpus)
    except ValueError:
        raise LaunchError(f"GPUS={gpus}: give a number of processes (GPUS=2) or `all` (every visible GPU).") from None
    if count < 1:
        raise LaunchError(f"GPUS={gpus}: give at least 1.")
    return count


def dora_command(overrides: tp.Sequence[str], processes: int = 1, fresh: bool = False) -> tp.List[str]:
    """`dora run`, with `-d --ddp_workers N` for N processes; `fresh`: dora's --clear, which removes the
    experiment's folder first (no resume)."""
    return [
        "dora",
        "-P",
        "musicgen_finetune",
        "run",
        *(["-d", "--ddp_workers", str(processes)] if processes > 1 else []),
        *(["--clear"] if fresh else []),
        *overrides,
    ]


def run_dora(command: tp.Sequence[str]) -> int:
    """The `dora` command line, with the venv's bin (ffmpeg, dora) first on PATH; its exit status.
    `dora run` without -d trains in the process that calls it, so it runs here, where AudioCraft is already
    imported (a second interpreter would import it again: seconds per run); with -d dora starts its own workers."""
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if "-d" in command:
        return subprocess.run(command).returncode
    argv, cwd = sys.argv, os.getcwd()
    sys.argv = list(command)
    try:
        dora_main()
        return 0
    except SystemExit as exit_:  # Hydra reports a failed run and exits 1
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        os.chdir(cwd)  # Hydra runs the experiment inside its folder


def check_device(cfg, how: str = "make train") -> None:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LaunchError(
            f"This preset trains on a CUDA GPU and none is visible. On a CPU, use the tiny model's "
            f"preset: `{how} ... PRESET=finetune/cpu_tiny` (with LORA=1: finetune/cpu_tiny_lora; "
            "`make demo` shows it), or add `device=cpu autocast=false` to this preset's overrides to "
            "try it anyway (very slow at musicgen-small's size)."
        )


def check_preset(preset: str) -> None:
    if not any((root / "solver" / f"{preset}.yaml").is_file() for root in (CONFIG_DIR, upstream_config_dir())):
        ours = sorted(
            p.relative_to(CONFIG_DIR / "solver").with_suffix("").as_posix()
            for p in (CONFIG_DIR / "solver").rglob("*.yaml")
        )
        raise LaunchError(
            f"PRESET={preset}: there is no config/solver/{preset}.yaml (LORA=1 adds _lora to the "
            f"preset's name). Presets: {', '.join(ours)}."
        )


def check_batch(cfg, gpus: int = 1) -> None:
    """Each process's share of the batch must split into the accumulation's micro-batches, before anything
    starts; with `optim.grad_accum_steps=auto`, some micro-batch must fit the GPU (planning.fit.check_fits shows the
    table and raises NothingFitsError, saying what would fit, when none does)."""
    steps = 1 if is_auto(cfg) else int(cfg.optim.get("grad_accum_steps") or 1)
    if cfg.dataset.batch_size % gpus or cfg.dataset.batch_size // gpus < steps:
        raise LaunchError(
            f"dataset.batch_size={cfg.dataset.batch_size} over {gpus} process(es) and "
            f"optim.grad_accum_steps={steps}: each GPU needs a multiple of {gpus} split into at least "
            f"{steps} micro-batches. Raise dataset.batch_size or lower optim.grad_accum_steps."
        )
    check_fits(cfg, gpus)


def check_not_running(folder: Path) -> None:
    """Refuse at once when another process trains this experiment now (the run takes the lock itself)."""
    with RunLock(folder):
        pass


def get_xp(overrides: tp.Sequence[str]):
    """dora's experiment (signature, folder, config) for these overrides; Hydra's refusals as one OverrideError."""
    try:
        return main.get_xp(list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        message = " ".join(str(err).split())
        raise OverrideError(f"the config cannot be composed with these overrides: {message}") from None


def plan(
    model: str,
    name: str,
    t5: tp.Optional[str] = None,
    preset: str = DEFAULT_PRESET,
    extra: tp.Sequence[str] = (),
    device_check: bool = True,
    how: str = "make train",
) -> tp.Tuple[tp.List[str], tp.Any]:
    """The overrides for a fine-tune of `model` on dataset `name`, and its dora XP (signature, folder, config),
    with every override and value checked; nothing is created.

    Args:
        model, name, t5, preset: as `make train` takes them (MODEL, NAME, T5, PRESET).
        extra: the user's overrides (ARGS).
        device_check: False where the run happens elsewhere (a grid listed on a Slurm login node).
        how: the command the user typed, for the messages.
    """
    check_preset(preset)
    files = open_model(model, t5)
    base = [f"solver={preset}", *pretrained_overrides(files), *dataset_overrides(name, files)]
    check_override_keys(extra, get_xp(base).cfg, [CONFIG_DIR, upstream_config_dir()])
    composed = get_xp([*base, *extra]).cfg
    overrides = [*base, *xp_cfg.architecture_overrides(files.xp_cfg, composed), *extra]
    xp = get_xp(overrides)
    if device_check:  # first: on a machine without a GPU, the preset is what to change
        check_device(xp.cfg, how)
    check_values(xp.cfg)
    if xp.cfg.get("lora") and xp.cfg.lora.enabled:
        lora_config = LoraConfig.from_dict(xp.cfg.lora)  # its own checks: targets, layers
        if lora_config.init_from:  # the adapters to continue fit the model and this run's settings
            adapter = read_adapter(
                lora_config.init_from, model_dir.load_package(files.lm)["best_state"], what="lora.init_from"
            )
            check_continuable(adapter.config, lora_config, lora_config.init_from)
    print(f"Model: {files.describe()}")
    return overrides, xp


def run(
    model: str,
    name: str,
    t5: tp.Optional[str] = None,
    preset: str = DEFAULT_PRESET,
    extra: tp.Sequence[str] = (),
    gpus: tp.Union[int, str] = 1,
    fresh: bool = False,
) -> Path:
    """`make train`: plan, run `dora run`, say where everything is; returns the experiment folder.

    A refusal inside training (a replaced base model) was printed by the run as one `error:` line: exit 2 here
    too. An interrupted run says how to resume; a failed one where its log is."""
    overrides, xp = plan(model, name, t5, preset, extra)
    processes = processes_of(gpus)
    check_batch(xp.cfg, processes)
    check_not_running(xp.folder)
    if fresh and xp.folder.exists():
        print(f"FRESH: removing {xp.folder} and starting this experiment again", flush=True)
    ended = None if fresh else read_done(xp.folder)
    command = dora_command(overrides, processes, fresh)
    print("Running: " + shlex.join(command), flush=True)
    if xp.cfg.logging.get("log_tensorboard"):
        print(f"Watch it: make board XP={xp.sig} (TensorBoard), make runs (every experiment)", flush=True)
    checkpoint, log = xp.folder / CHECKPOINT_FILE, xp.folder / LOG_FILE
    try:
        returncode = run_dora(command)
    except KeyboardInterrupt:
        resume = (
            f"re-running the same command resumes from {checkpoint}"
            if checkpoint.is_file()
            else "no checkpoint was written yet: re-running the same command starts it again"
        )
        print(f"Interrupted: {resume}.", file=sys.stderr, flush=True)
        raise
    if returncode == USER_ERROR_STATUS:
        raise SystemExit(USER_ERROR_STATUS)  # the run printed its one error line
    if returncode != 0:
        raise SystemExit(f"Training failed (exit {returncode}); the log is {log}.")
    if ended:
        print(
            f"Experiment {xp.sig} had already ended ({ended['reason']}, {ended['epochs']} epochs, best epoch "
            f"{ended['best_epoch']}): nothing was trained. FRESH=1 trains it again from the start; more epochs "
            "(ARGS='optim.epochs=<n>') make a new experiment."
        )
    print(
        f"Experiment {xp.sig}: {xp.folder}\n"
        f"  checkpoint {checkpoint}\n"
        f"  log        {log}\n"
        f"  samples    {xp.folder / 'samples'}"
    )
    return xp.folder
