"""`make doctor`: is this machine ready to fine-tune, and if not, what to do about it."""

import os
import shutil
import subprocess
import sys
import tempfile
import typing as tp
from pathlib import Path

import torch

from .errors import UserError
from .launch import DEFAULT_PRESET
from .models import folder as model_dir
from .models.open import open_model
from .paths import manifests_root, output_dir, upstream_config_dir
from .planning import command as plan_command
from .planning.fit import NothingFitsError, Planner, choose_micro_batch
from .planning.gpu import training_device
from .planning.trace import run_models

# A full fine-tune's lean checkpoint.th (checkpoints.py) holds the fp32 weights and AdamW's two moments, 12 bytes a
# parameter: 5,044.8 MB for musicgen-small (make bench BENCH_ARGS=--full-size-only). It is written to a temporary file
# and renamed, so two exist for a moment; the best epoch's state, when it is not the checkpoint's, is one more file
# in fp16; an export adds the fp32 weights once more.
CHECKPOINT_BYTES_PER_PARAMETER = 12
BEST_STATE_BYTES_PER_PARAMETER = 2
EXPORT_BYTES_PER_PARAMETER = 4
MUSICGEN_SMALL_PARAMETERS = 419_617_792


def disk_needed(parameters: int) -> float:
    """GiB a full fine-tune of a model of `parameters` LM parameters writes at its peak."""
    return (
        parameters
        * (2 * CHECKPOINT_BYTES_PER_PARAMETER + BEST_STATE_BYTES_PER_PARAMETER + EXPORT_BYTES_PER_PARAMETER)
        / 2**30
    )


class Check(tp.NamedTuple):
    ok: bool
    what: str
    detail: str  # what was found, or what to do


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = (3, 10) <= sys.version_info[:2] <= (3, 12)
    return Check(ok, "python", version if ok else f"{version}: use Python 3.10-3.12 (make setup PYTHON=...)")


def check_gpu() -> Check:
    if not torch.cuda.is_available():
        return Check(
            True,
            "gpu",
            "none visible: the tiny demo runs on the CPU; fine-tuning musicgen-small needs a "
            "CUDA GPU (the finetune/musicgen_small preset is sized for 24 GB)",
        )
    props = torch.cuda.get_device_properties(0)
    memory = props.total_memory / 2**30
    bf16 = torch.cuda.is_bf16_supported()
    detail = f"{torch.cuda.device_count()} x {props.name}, {memory:.0f} GiB, bf16 {'yes' if bf16 else 'no'}"
    if not bf16:
        detail += " (use ARGS='autocast_dtype=float16', which adds loss scaling)"
    return Check(memory >= 15, "gpu", detail if memory >= 15 else detail + ": under 16 GiB, lower dataset.batch_size")


def check_ffmpeg() -> Check:
    path = shutil.which("ffmpeg")
    if not path:
        return Check(
            False,
            "ffmpeg",
            "not on PATH: AudioCraft writes every audio file through it. Run `make setup` "
            "(it links the imageio-ffmpeg binary into .venv/bin) or install ffmpeg.",
        )
    result = subprocess.run([path, "-version"], capture_output=True, text=True)
    first = (result.stdout.splitlines() or ["?"])[0]
    return Check(result.returncode == 0, "ffmpeg", f"{path}: {first}")


def check_upstream() -> Check:
    try:
        return Check(True, "audiocraft config", str(upstream_config_dir()))
    except UserError as err:
        return Check(False, "audiocraft config", str(err))


def check_model(model: str, t5: tp.Optional[str]) -> tp.Tuple[tp.List[Check], tp.Optional[model_dir.ModelFiles]]:
    try:
        files = open_model(model, t5)
    except UserError as err:
        return [Check(False, "model", str(err))], None
    checks = [
        Check(
            True,
            "model",
            f"{files.lm} ({files.tensors} tensors, {files.parameters / 1e6:.1f} M parameters), {files.compression}",
        )
    ]
    if files.t5 is not None:
        checks.append(Check(True, "t5", str(files.t5)))
    return checks, files


def check_fit(files: model_dir.ModelFiles) -> tp.List[Check]:
    """What `optim.grad_accum_steps=auto` picks for this model on this machine's GPU (without one: on the presets'
    24 GB card), full fine-tuning and LoRA, at the presets' batch and segment."""
    checks = []
    t5 = [f"conditioners.description.t5.name={files.t5}"] if files.t5 else []
    for what, preset in (("fit full", DEFAULT_PRESET), ("fit LoRA", DEFAULT_PRESET + "_lora")):
        run = plan_command.compose_run(plan_command.Request(str(files.root), preset=preset, extra=t5), values=False)
        device = training_device(run.cfg.device)
        try:
            choice = choose_micro_batch(Planner(run_models(run.cfg, run.root), device))
        except NothingFitsError as err:
            checks.append(Check(not torch.cuda.is_available(), what, str(err)))
            continue
        checks.append(Check(True, what, choice.describe(int(run.cfg.dataset.batch_size), device)))
    return checks


def check_writable(path: Path, what: str) -> Check:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        return Check(False, what, f"{path} is not writable ({err.strerror}); set OUTPUT=<writable folder>")
    return Check(True, what, f"{path} writable")


def check_disk(path: Path, parameters: int = MUSICGEN_SMALL_PARAMETERS, model: str = "musicgen-small") -> Check:
    """Room at `path` for a full fine-tune of a model of `parameters` LM parameters (LoRA needs far less)."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    free = shutil.disk_usage(existing).free / 2**30
    needed = disk_needed(parameters)
    detail = f"{free:.1f} GiB free at {existing}; a full fine-tune of {model} writes up to {needed:.2g} GiB"
    if free < needed:
        return Check(
            False,
            "disk",
            f"{detail} (checkpoint.th with its optimizer state, twice while it is replaced, "
            "and an export): free some space or move outputs with OUTPUT=<folder>",
        )
    return Check(True, "disk", detail)


def check_hub() -> Check:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return Check(
        True,
        "hub",
        "offline (HF_HUB_OFFLINE=1): nothing is downloaded"
        if offline
        else "reachable if the network allows: AudioCraft may try to download",
    )


def run(model: tp.Optional[str] = None, t5: tp.Optional[str] = None) -> int:
    """`make doctor`: print every check with what to do about it; 1 when something must be fixed."""
    checks = [check_python(), check_gpu(), check_ffmpeg(), check_upstream(), check_hub()]
    files = None
    if model:
        model_checks, files = check_model(model, t5)
        checks += model_checks
        if files:
            checks += check_fit(files)
    disk = check_disk(output_dir(), files.parameters, str(files.root)) if files else check_disk(output_dir())
    checks += [check_writable(output_dir(), "output"), check_writable(manifests_root(), "manifests"), disk]
    for check in checks:
        print(f"{'ok ' if check.ok else 'FIX'}  {check.what:<18} {check.detail}")
    failed = [c for c in checks if not c.ok]
    print("All good." if not failed else f"{len(failed)} thing(s) to fix, above.")
    return 1 if failed else 0
