"""Exact resume: a run killed with SIGKILL at any moment (mid-epoch, during validation, while its checkpoint is
written, during sample generation) and resumed by the same command ends where the uninterrupted run ends, bit for
bit on the CPU: the same weights and the same history (wall-clock durations apart). The kills come from
tests/process_hooks (MUSICGEN_FT_TEST_KILL_AT), as a preemption or the OOM killer would deliver them."""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import flashy
import numpy as np
import pytest
import torch
from conftest import DATASET, TRAIN, one_error_line, run_tool, train, xp_folder
from test_solver import bare_solver

from musicgen_finetune import random_state
from musicgen_finetune.experiments import RunLock

TIMINGS = ("duration", "rtf")  # wall-clock measurements: the only values allowed to differ (and "time", below)


def without_timings(history: list) -> list:
    return [
        {
            stage: {k: v for k, v in metrics.items() if k not in TIMINGS}
            for stage, metrics in epoch.items()
            if stage != "time"
        }
        for epoch in history
    ]


def run_killed_and_resumed(workdir, tmp_path, model, preset, kill_points):
    """The default cpu_tiny run (3 epochs) in its own output folder, killed at each point in turn, each time
    re-run with the same command; then run once more to the end. Returns its experiment folder."""
    env = {"MUSICGEN_FT_OUTPUT": str(tmp_path), "AUDIOCRAFT_DORA_DIR": str(tmp_path)}
    command = [TRAIN, "--model", str(model), "--name", DATASET, "--preset", preset]
    for point in kill_points:
        killed = run_tool(command, workdir, extra_env={**env, "MUSICGEN_FT_TEST_KILL_AT": point})
        assert killed.returncode == -signal.SIGKILL, f"not killed at {point}: {killed.stderr[-3000:]}"
    finished = run_tool(command, workdir, extra_env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return xp_folder(finished)


def assert_same_run(resumed, uninterrupted, keys=None):
    ours = torch.load(resumed / "checkpoint.th", weights_only=True)
    theirs = torch.load(uninterrupted / "checkpoint.th", weights_only=True)
    assert ours["model"].keys() == theirs["model"].keys()
    for key in keys or theirs["model"]:
        assert torch.equal(ours["model"][key], theirs["model"][key]), key
    resumed_history = json.loads((resumed / "history.json").read_text())
    assert without_timings(resumed_history) == without_timings(json.loads((uninterrupted / "history.json").read_text()))
    assert len(resumed_history) == 3


def test_full_run_killed_mid_epoch_ends_as_the_uninterrupted_one(first_run, resumed_run):
    """Killed before epoch 2's second update (conftest.KILLED_AT): the resume restores epoch 1's weights, optimizer,
    schedule, data order and every random state, and retrains epoch 2 exactly."""
    folder, _, resumed = resumed_run
    assert "Loading existing checkpoint" in resumed.stderr + resumed.stdout
    assert_same_run(folder, xp_folder(first_run))


@pytest.mark.long
def test_full_run_killed_anywhere_ends_as_the_uninterrupted_one(first_run, workdir, tiny_model, dataset, tmp_path):
    # mid-epoch 2, then at epoch 2's validation, then halfway through writing epoch 2's checkpoint, then while the
    # last epoch generates its samples
    resumed = run_killed_and_resumed(
        workdir, tmp_path, tiny_model, "finetune/cpu_tiny", ["train:2:1", "valid:2", "checkpoint:2", "generate:3"]
    )
    assert_same_run(resumed, xp_folder(first_run))


@pytest.mark.long
def test_lora_run_killed_anywhere_ends_as_the_uninterrupted_one(lora_run, workdir, lora_model, tmp_path):
    resumed = run_killed_and_resumed(
        workdir, tmp_path, lora_model, "finetune/cpu_tiny_lora", ["checkpoint:1", "train:3:1"]
    )
    adapters = [key for key in torch.load(resumed / "checkpoint.th", weights_only=True)["model"]]
    assert adapters and all(".lora_" in key for key in adapters)  # a LoRA checkpoint holds its adapters only
    assert_same_run(resumed, xp_folder(lora_run), adapters)


def test_an_unreadable_checkpoint_is_named_with_the_ways_out(first_run, workdir, tiny_model, tmp_path):
    folder = tmp_path / "xps" / xp_folder(first_run).name
    shutil.copytree(xp_folder(first_run), folder)
    data = (folder / "checkpoint.th").read_bytes()
    (folder / "checkpoint.th").write_bytes(data[: len(data) // 3])  # a disk that filled up, a copy cut short
    env = {"MUSICGEN_FT_OUTPUT": str(tmp_path), "AUDIOCRAFT_DORA_DIR": str(tmp_path)}
    result = run_tool(
        [TRAIN, "--model", str(tiny_model), "--name", DATASET, "--preset", "finetune/cpu_tiny"], workdir, extra_env=env
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"{folder / 'checkpoint.th'} cannot be read" in line and "FRESH=1" in line and "good copy" in line


def test_a_second_run_of_a_running_experiment_refuses_at_once(first_run, workdir, tiny_model):
    folder = xp_folder(first_run)
    with RunLock(folder):  # this process trains it, as far as anyone can tell
        result = train(workdir, tiny_model)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"{folder} is being trained right now by pid {os.getpid()}" in line
    assert "Running: dora" not in result.stdout


def test_the_lock_of_a_killed_run_blocks_nothing(tmp_path):
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            f"""
import os
from musicgen_finetune.experiments import RunLock
RunLock({str(tmp_path)!r}).__enter__()
os.kill(os.getpid(), 9)
""",
        ],
        capture_output=True,
    )
    assert holder.returncode == -signal.SIGKILL and (tmp_path / "run.lock").is_file()
    with RunLock(tmp_path):  # taken at once: the kernel released the dead process's lock
        pass


# -- random_state.py and the solver's restore, without a run ------------------------------------------------------


class WithOwnGenerator(torch.nn.Module):
    """A module keeping its own generator as `rng`, as upstream's conditioner dropouts do (DropoutModule)."""

    def __init__(self):
        super().__init__()
        self.rng = torch.Generator().manual_seed(0)


def seed_everything(seed: int, model: torch.nn.Module) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model.dropout.rng.manual_seed(seed)


def draws(model: torch.nn.Module) -> tuple:
    """One draw from every generator training uses (numpy's normal twice: its second value is cached, has_gauss)."""
    return (
        random.random(),
        np.random.random(),
        np.random.standard_normal(),
        np.random.standard_normal(),
        torch.rand(2).tolist(),
        torch.rand(2, generator=model.dropout.rng).tolist(),
    )


@pytest.fixture
def model():
    """A model with a generator of its own; the test's draws leave the session's global generators as they were."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield torch.nn.ModuleDict({"dropout": WithOwnGenerator()})
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)


def test_a_restored_random_state_draws_what_the_captured_one_did(model):
    seed_everything(5, model)
    np.random.standard_normal()  # numpy now holds a cached second normal (has_gauss), which the state must keep
    state = random_state.capture(model)
    expected = draws(model)
    seed_everything(6, model)
    random_state.restore(through_a_checkpoint(state), model)
    assert draws(model) == expected


def through_a_checkpoint(value):
    """`value` saved and read back as checkpoints are (torch's weights-only unpickler)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_each_process_resumes_with_the_random_state_it_saved(model, tmp_path, monkeypatch):
    """A checkpoint holds every process's random state, in rank order; each process must draw on from its own (a
    process taking another's would repeat that one's dropout masks and data order)."""
    saved, expected = [], []
    for seed in (1, 2, 3):  # what ranks 0, 1 and 2 saved, and what each then draws
        seed_everything(seed, model)
        saved.append(random_state.capture(model))
        expected.append(draws(model))
    # rank 3: a run resumed on more processes than it saved, whose extra processes start from rank 0's state
    for rank, want in ((1, expected[1]), (2, expected[2]), (0, expected[0]), (3, expected[0])):
        monkeypatch.setattr(flashy.distrib, "rank", lambda rank=rank: rank)
        seed_everything(99, model)
        solver = bare_solver({}, tmp_path)
        solver.model = model
        solver.load_state_dict({"random_states": through_a_checkpoint(saved)})
        assert draws(model) == want, f"rank {rank}"
        assert len(solver.random_states) == 3  # kept whole, for the next checkpoint


def test_a_state_read_back_as_lists_or_without_module_generators_restores(model):
    """random's state as lists (what a JSON or a generic loader gives back for tuples) and a state from before modules'
    own generators were saved (no "modules") both restore."""
    seed_everything(5, model)
    state = random_state.capture(model)
    expected = draws(model)
    version, internal, gauss = state["python"]
    seed_everything(6, model)
    random_state.restore({**state, "python": [version, list(internal), gauss]}, model)
    assert draws(model) == expected
    older = {key: value for key, value in state.items() if key != "modules"}
    seed_everything(6, model)
    random_state.restore(older, model)
    assert draws(model)[:5] == expected[:5]  # the module's own generator is left as it was
    assert random_state.module_generators(None) == {} and random_state.capture(None)["modules"] == {}


def test_cuda_generators_are_saved_and_restored_on_the_devices_both_have(model, monkeypatch):
    """No GPU here: torch.cuda's generator calls are stood in for, to see which states go to which device."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["cuda0", "cuda1"])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    state = random_state.capture(model)
    assert state["cuda"] == ["cuda0", "cuda1"]
    for devices, expected in (
        (1, [("cuda0", 0)]),
        (2, [("cuda0", 0), ("cuda1", 1)]),
        (4, [("cuda0", 0), ("cuda1", 1)]),
    ):
        restored.clear()
        monkeypatch.setattr(torch.cuda, "device_count", lambda devices=devices: devices)
        random_state.restore(state, model)
        assert restored == expected, devices
    restored.clear()
    random_state.restore({**state, "cuda": []}, model)  # saved on a machine without CUDA
    assert restored == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert random_state.capture(model)["cuda"] == []
    random_state.restore(state, model)  # saved with CUDA, restored without: the CPU generators only
    assert restored == []


def test_the_run_lock_names_its_holder_and_lets_go(tmp_path):
    import fcntl
    import re
    import socket

    from musicgen_finetune.experiments import ExperimentRunningError

    folder = tmp_path / "xps" / "abcd1234"  # made by the lock
    RunLock(folder).__exit__(None, None, None)  # never entered: nothing to release
    (folder).mkdir(parents=True)
    (folder / "run.lock").write_text("pid 1 on gone, started long ago\n")  # a killed run's
    with RunLock(folder) as lock:
        text = (folder / "run.lock").read_text()
        assert re.fullmatch(
            rf"pid {os.getpid()} on {re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\n", text
        )
        with pytest.raises(ExperimentRunningError) as refused:
            with RunLock(folder):
                pass
        assert str(refused.value) == (
            f"{folder} is being trained right now by {text.strip()}: wait for it to end, or stop it "
            "(re-running the same command afterwards resumes from its last checkpoint)."
        )
    assert lock.file is None
    lock.__exit__(None, None, None)  # a second release: nothing
    with RunLock(tmp_path / "new" / "xp"):  # the folder is made, parents too
        pass
    # a holder that wrote nothing yet
    (folder / "run.lock").write_text("")
    with open(folder / "run.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ExperimentRunningError, match="right now by another process: wait"):
            RunLock(folder).__enter__()
