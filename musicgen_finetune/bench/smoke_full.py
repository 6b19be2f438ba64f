"""`make smoke-full`: every stage at musicgen-small's real size, on the CPU, through the real tools, offline.

The model is random weights in musicgen-small's released layout (models/full_size.py, written once to
output/models/musicgen-small-random). Each stage runs as its own process, as a user types it, with 1 s segments and
2 optimizer updates, and is timed; its peak memory is the largest resident set of that process or any it waited for
(os.wait4's rusage). The model written, the full run's checkpoint and every exported model are checked against the
published musicgen-small tensor list (models/published.py). Results: output/bench/smoke_full.json.
"""

import json
import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

from ..files import write_text_atomically
from ..machine import describe, one_line
from ..models import folder as model_dir
from ..models import published
from ..patches import safe_load
from ..paths import REPO_ROOT, output_dir

DATASET = "smoke-full"
PROMPT = "hip hop 808 beat with trap drums"
# Overrides of the CPU preset (finetune/cpu_tiny[_lora]) for a run of 2 updates of one 1 s segment each. Two
# epochs with stop_after_epoch=1: upstream runs the generate stage on the last epoch (solvers/base.py:508), which
# the run never reaches; the one validation segment still makes a best state for `make export`.
TRAIN_ARGS = (
    "optim.epochs=2 stop_after_epoch=1 optim.updates_per_epoch=2 optim.grad_accum_steps=1 dataset.batch_size=1 "
    "dataset.segment_duration=1 dataset.valid.num_samples=1 dataset.generate.num_samples=1 "
    "schedule.cosine.warmup=1 logging.log_tensorboard=false"
)


class SmokeFailure(RuntimeError):
    """A stage failed or a model's tensors differ from the published list."""


def run_stage(name: str, argv: tp.Sequence[str], results: tp.List[dict]) -> None:
    """Run one stage as a child process; record its wall time and peak resident memory."""
    print(f"== {name}: {' '.join(argv)}", flush=True)
    begin = time.monotonic()
    process = subprocess.Popen(list(argv), cwd=REPO_ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    row = {
        "stage": name,
        "wall_s": round(time.monotonic() - begin, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "status": process.returncode,
    }
    results.append(row)
    print(f"   {name}: {row['wall_s']} s, peak RSS {row['peak_rss_gib']} GiB", flush=True)
    if process.returncode != 0:
        raise SmokeFailure(f"stage {name} exited with status {process.returncode}")


def check_tensors(what: str, state: tp.Mapping[str, tp.Any], checks: tp.List[dict]) -> None:
    """`state`'s names and shapes must be the published musicgen-small LM's."""
    shapes = published.shapes_of(state)
    lines = published.differences(shapes)
    checks.append({"what": what, "tensors": len(shapes), "parameters": published.count(shapes), "differences": lines})
    if lines:
        raise SmokeFailure(f"{what} differs from the published musicgen-small tensors: " + "; ".join(lines))
    print(f"   {what}: the published {len(shapes)} tensors, {published.count(shapes):,} parameters", flush=True)


def check_model_folder(folder: Path, checks: tp.List[dict]) -> None:
    state = safe_load(folder / model_dir.LM_FILE, mmap=True)["best_state"]
    check_tensors(f"{folder.name}/{model_dir.LM_FILE}", state, checks)


def main(out: tp.Optional[Path] = None) -> Path:
    python = sys.executable
    work = output_dir() / "smoke_full"
    model = output_dir() / "models" / "musicgen-small-random"
    data, exports = work / "data", work / "exports"
    stages: tp.List[dict] = []
    checks: tp.List[dict] = []
    begin = time.monotonic()

    run_stage(
        "write model",
        [python, "-c", f"from musicgen_finetune.models.full_size import write_full_size_model; "
         f"write_full_size_model({str(model)!r})"],
        stages,
    )  # fmt: skip
    check_model_folder(model, checks)
    run_stage(
        "data", [python, "egs/hiphop808/make_data.py", "--out", str(data), "--count", "4", "--seconds", "2"], stages
    )
    run_stage(
        "manifests",
        [python, "tools/manifests.py", "--data", str(data), "--name", DATASET, "--model", str(model),
         "--segment", "1", "--valid", "0.25", "--workers", "1"],
        stages,
    )  # fmt: skip

    xps = {}
    for mode, preset in (("full", "finetune/cpu_tiny"), ("lora", "finetune/cpu_tiny_lora")):
        xp_file = work / f"{mode}.xp"
        run_stage(
            f"train {mode}",
            [python, "tools/train.py", "--model", str(model), "--name", DATASET, "--preset", preset,
             "--args", TRAIN_ARGS, "--xp-file", str(xp_file), "--fresh"],
            stages,
        )  # fmt: skip
        xps[mode] = Path(xp_file.read_text().strip())
    check_tensors("full run's checkpoint.th", safe_load(xps["full"] / "checkpoint.th", mmap=True)["model"], checks)

    for mode in ("full", "lora"):
        run_stage(
            f"export {mode}", [python, "tools/export.py", "--xp", str(xps[mode]), "--out", str(exports / mode)], stages
        )
        check_model_folder(exports / mode, checks)

    run_stage(
        "generate",
        [python, "tools/generate.py", "--model", str(exports / "full"), "--prompts", PROMPT, "--duration", "0.5",
         "--batch", "1", "--out", str(work / "generated")],
        stages,
    )  # fmt: skip
    run_stage(
        "eval",
        [python, "tools/eval.py", "--base", str(model), "--name", DATASET, "--tuned", str(exports / "full"),
         "--adapter", str(exports / "lora" / "adapters.safetensors"), "--prompts", PROMPT, "--duration", "0.5",
         "--out", str(work / "report")],
        stages,
    )  # fmt: skip
    run_stage(
        "export-hf", [python, "tools/export_hf.py", "--model", str(exports / "full"), "--out", str(work / "hf")], stages
    )
    run_stage(
        "import-hf", [python, "tools/import_hf.py", "--hf", str(work / "hf"), "--out", str(work / "imported")], stages
    )
    check_model_folder(work / "imported", checks)
    run_stage(
        "export-peft",
        [python, "tools/export_peft.py", "--adapter", str(exports / "lora" / "adapters.safetensors"),
         "--out", str(work / "peft")],
        stages,
    )  # fmt: skip

    result = {
        "machine": describe(),
        "total_wall_s": round(time.monotonic() - begin, 1),
        "peak_rss_gib": max(row["peak_rss_gib"] for row in stages),
        "stages": stages,
        "checks": checks,
    }
    out = out or output_dir() / "bench" / "smoke_full.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(f"== smoke-full passed on {one_line(result['machine'])}", flush=True)
    for row in stages:
        print(f"   {row['stage']:<12} {row['wall_s']:>7.1f} s  peak RSS {row['peak_rss_gib']:5.2f} GiB", flush=True)
    print(f"   {'total':<12} {result['total_wall_s']:>7.1f} s  (largest {result['peak_rss_gib']:.2f} GiB)", flush=True)
    return out
