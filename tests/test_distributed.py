"""Several training processes through dora and torch.distributed (`make train GPUS=2`): on a machine without GPUs
they are CPU processes talking over gloo, the same code path as NCCL between GPUs."""

import json
import subprocess

import pytest
from conftest import DATASET, REPO, TRAIN, run_tool, xp_folder


@pytest.mark.long  # three interpreters (dora's launcher and two workers); each process's restore: test_resume.py
def test_two_processes_train_as_one_at_the_same_global_batch(first_run, workdir, tiny_model, dataset, tmp_path):
    env = {"MUSICGEN_FT_OUTPUT": str(tmp_path), "AUDIOCRAFT_DORA_DIR": str(tmp_path)}
    result = run_tool(
        [TRAIN, "--model", str(tiny_model), "--name", DATASET, "--preset", "finetune/cpu_tiny", "--gpus", "2"],
        workdir,
        extra_env=env,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "run -d --ddp_workers 2 " in result.stdout
    folder, single = xp_folder(result), xp_folder(first_run)
    log = (folder / "solver.log.0").read_text()
    assert "Distributed init: 0/2" in log
    # gradients averaged over the processes at every update: both hold the same weights after every epoch
    assert all(f"Weights identical on the 2 processes after epoch {epoch}" in log for epoch in (1, 2, 3))
    # the same global batch (4, as 2 x 2) learns what one process learns, up to the order of the data
    history = json.loads((folder / "history.json").read_text())
    reference = json.loads((single / "history.json").read_text())
    assert len(history) == len(reference) == 3
    for ours, theirs in zip(history, reference, strict=True):
        assert abs(ours["valid"]["ce"] - theirs["valid"]["ce"]) <= 0.02 * theirs["valid"]["ce"]
    # rank 0 alone writes the checkpoint, done.json and every sample, under the names one process gives them
    assert (folder / "checkpoint.th").is_file() and json.loads((folder / "done.json").read_text())["epochs"] == 3
    assert not list(folder.glob("checkpoint.th.*"))
    samples = sorted(p.name for p in (folder / "samples" / "3").iterdir())
    assert samples == sorted(p.name for p in (single / "samples" / "3").iterdir())


def test_make_train_passes_gpus():
    dry = subprocess.run(
        ["make", "-n", "train", "MODEL=m", "NAME=n", "GPUS=2"], cwd=REPO, capture_output=True, text=True
    )
    assert "--gpus 2" in dry.stdout, dry.stdout + dry.stderr


def test_gpus_all_without_a_gpu_says_to_give_a_number(workdir, tiny_model, dataset):
    result = run_tool(
        [TRAIN, "--model", str(tiny_model), "--name", DATASET, "--preset", "finetune/cpu_tiny", "--gpus", "all"],
        workdir,
    )
    assert result.returncode == 2 and "GPUS=all: no GPU is visible" in result.stderr and "GPUS=2" in result.stderr
