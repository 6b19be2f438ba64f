"""Lean checkpoints (musicgen_finetune/checkpoints.py) and where an epoch's time goes, on one tiny run whose last
epoch validates worse than an earlier one (so its best state lives in a file), killed before its last update and
resumed from the checkpoint that refers to that file."""

import json
import signal
import threading
import time

import pytest
import torch
from conftest import DATASET, TRAIN, run_tool, xp_folder
from test_solver import bare_solver

from musicgen_finetune import checkpoints, export
from musicgen_finetune.patches import safe_load

# the learning rate x10 after each epoch's 5 updates (18 segments, batch 4): epoch 1 improves, then the run validates
# worse, so the best state (epoch 1) is kept in a file
ARGS = "schedule.lr_scheduler=step schedule.step.step_size=5 schedule.step.gamma=10"


def tensors_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensors_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensors_bytes(v) for v in value)
    return 0


@pytest.fixture(scope="module")
def worse_run(workdir, tiny_model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("lean")
    env = {"MUSICGEN_FT_OUTPUT": str(out), "AUDIOCRAFT_DORA_DIR": str(out)}
    command = [TRAIN, "--model", str(tiny_model), "--name", DATASET, "--preset", "finetune/cpu_tiny", "--args", ARGS]
    killed = run_tool(command, workdir, extra_env={**env, "MUSICGEN_FT_TEST_KILL_AT": "train:3:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = run_tool(command, workdir, extra_env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    folder = xp_folder(finished)
    history = json.loads((folder / "history.json").read_text())
    scores = [epoch["valid"]["ce"] for epoch in history]
    best = scores.index(min(scores)) + 1
    assert best < len(history), f"precondition: the last epoch must not be the best ({scores}); raise the lr in ARGS"
    return folder, history, best


def test_the_best_state_is_one_fp16_file_the_checkpoint_refers_to(worse_run):
    folder, history, best = worse_run
    checkpoint = safe_load(folder / "checkpoint.th")
    assert checkpoint["best_state"] == {"lean": {"epoch": best, "file": f"best_state_{best}.th"}}
    assert sorted(p.name for p in folder.glob("best_state_*")) == [f"best_state_{best}.th"]
    assert not list(folder.glob(".*.partial"))
    saved = safe_load(folder / f"best_state_{best}.th")
    assert saved["epoch"] == best
    weights = saved["best_state"]["model"]
    assert weights.keys() == checkpoint["model"].keys()
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    assert not all(torch.equal(v.float(), checkpoint["model"][k].float()) for k, v in weights.items())


def test_each_epoch_says_where_its_time_went_and_what_it_wrote(worse_run):
    folder, history, best = worse_run
    for entry in history:
        assert set(entry["time"]) >= {"train", "valid", "generate"}
        assert entry["time"]["train"] == entry["train"]["duration"]
    assert history[-1]["time"]["generate"] > 0 and history[-1]["time"]["checkpoint"] >= 0
    checkpoint_bytes = tensors_bytes(safe_load(folder / "checkpoint.th"))
    best_bytes = tensors_bytes(safe_load(folder / f"best_state_{best}.th"))
    # the best-state file is written with the first checkpoint after the best epoch, and only then
    expected = [checkpoint_bytes + (best_bytes if epoch == best + 1 else 0) for epoch in range(1, len(history) + 1)]
    assert [entry["checkpoint"]["bytes"] for entry in history] == expected
    log = (folder / "solver.log.0").read_text()
    assert f"Epoch {len(history)} time: train" in log and "written in the background" in log


def test_export_best_exports_the_best_epoch_from_its_file(worse_run, tmp_path):
    folder, history, best = worse_run
    out = export.export(str(folder), tmp_path / "best", which="best")
    package = torch.load(out / "state_dict.bin", weights_only=True)
    weights = safe_load(folder / f"best_state_{best}.th")["best_state"]["model"]
    for key, value in weights.items():
        assert torch.equal(package["best_state"][key], value), key
    assert json.loads((out / "export.json").read_text())["epoch"] == best


def test_a_failed_write_leaves_the_previous_file_and_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.th"
    writer = checkpoints.BackgroundWriter(logger=__import__("logging").getLogger("test"))
    writer.start([(path, {"w": torch.ones(3)})], keep_best=None)
    writer.wait()
    real_save = torch.save

    def half_then_fail(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(file.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    writer.start([(path, {"w": torch.zeros(3)})], keep_best=None)
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.th"]


def test_bytes_per_epoch_count_one_checkpoint_and_one_best_file_per_write():
    from musicgen_finetune.bench.full_size import bytes_per_epoch

    row = {"upstream_bytes": 1000, "lean_bytes": 600, "best_file_bytes": 100}
    # upstream: 1000 every epoch; ours: (600 + 100) per write, 1 write (default interval) or 10 over 10 epochs
    assert bytes_per_epoch(row, 10, 1) == {"upstream": 1000, "lean": 70, "ratio": 0.07}
    assert bytes_per_epoch(row, 10, 10) == {"upstream": 1000, "lean": 700, "ratio": 0.7}


# -- references, snapshots and clean-up, in-process (make mutate) --------------------------------------------------


def test_a_reference_resolves_to_its_best_state_file(tmp_path):
    weights = {"model": {"w": torch.arange(4, dtype=torch.float32), "steps": torch.tensor([7])}}
    torch.save({"epoch": 3, "best_state": weights}, tmp_path / "best_state_3.th")
    checkpoint = {"best_state": checkpoints.reference(3, in_file=True), "model": {"w": torch.zeros(4)}}
    assert checkpoints.referenced(checkpoint["best_state"]) == {"epoch": 3, "file": "best_state_3.th"}
    resolved = checkpoints.resolve_best_state(tmp_path, checkpoint)
    assert resolved.keys() == {"model"} and resolved["model"].keys() == {"w", "steps"}
    assert torch.equal(resolved["model"]["w"], weights["model"]["w"])

    # the file of another epoch (replaced by hand) and no file at all are both refused, naming the epoch wanted
    torch.save({"epoch": 2, "best_state": weights}, tmp_path / "best_state_3.th")
    with pytest.raises(checkpoints.MissingBestStateError, match="holds epoch 2, not 3"):
        checkpoints.resolve_best_state(tmp_path, checkpoint)
    (tmp_path / "best_state_3.th").unlink()
    with pytest.raises(checkpoints.MissingBestStateError) as missing:
        checkpoints.resolve_best_state(tmp_path, checkpoint)
    assert str(missing.value) == (
        f"{tmp_path / 'best_state_3.th'} is missing: {tmp_path / 'checkpoint.th'} keeps its best epoch (3) there. "
        "Put it back, or use the last state (make export WHICH=last; a new training run: FRESH=1)."
    )


def test_a_reference_to_the_checkpoints_own_weights_is_them_in_fp16_unless_lora(tmp_path):
    model = {"w": torch.tensor([1.0, 1.0 / 3.0]), "count": torch.tensor([5], dtype=torch.int64)}
    checkpoint = {"best_state": checkpoints.reference(4, in_file=False), "model": model}
    assert checkpoints.referenced(checkpoint["best_state"]) == {"epoch": 4, "file": None}
    best = checkpoints.resolve_best_state(tmp_path, checkpoint)["model"]
    assert best["w"].dtype == torch.float16 and best["w"].tolist() == [1.0, float(torch.tensor(1 / 3).half())]
    assert best["count"].dtype == torch.int64 and best["count"].tolist() == [5]
    lora_best = checkpoints.resolve_best_state(tmp_path, {**checkpoint, "lora": {"rank": 2}})["model"]
    assert lora_best["w"].dtype == torch.float32 and lora_best["w"].tolist() == model["w"].tolist()


def test_an_upstream_full_best_state_is_taken_as_it_is(tmp_path):
    full = {"model": {"w": torch.ones(2)}}
    assert checkpoints.referenced(full) is None
    assert checkpoints.referenced({"lean": {"epoch": 1}, "model": {}}) is None  # more than a reference
    assert checkpoints.referenced(None) is None
    assert checkpoints.resolve_best_state(tmp_path, {"best_state": full}) is full


def test_a_snapshot_is_unaffected_by_training_after_it_unless_told_not_to_copy():
    from types import SimpleNamespace

    state = {
        "model": {"w": torch.zeros(3)},
        "history": [{"ce": 1.0}],
        "shape": (torch.ones(2), "x"),
        "cfg": SimpleNamespace(targets=["q"]),  # any other object: copied to its depth
    }
    copied = checkpoints.snapshot(state)
    shared = checkpoints.snapshot(state, copy_tensors=False)
    state["model"]["w"] += 1  # the next epoch trains in place
    state["history"][0]["ce"] = 9.0
    state["shape"][0].mul_(5)
    state["cfg"].targets.append("k")
    assert copied["model"]["w"].tolist() == [0.0, 0.0, 0.0] and copied["shape"][0].tolist() == [1.0, 1.0]
    assert shared["model"]["w"].tolist() == [1.0, 1.0, 1.0]  # the last epoch's: written as they are
    assert shared["shape"][0].tolist() == [5.0, 5.0]  # inside tuples and lists too
    assert copied["cfg"].targets == ["q"] == shared["cfg"].targets
    assert copied["history"] == [{"ce": 1.0}] == shared["history"]  # everything else is copied either way
    assert isinstance(copied["shape"], tuple) and copied["shape"][1] == "x" and isinstance(copied["history"], list)
    assert not copied["model"]["w"].requires_grad


def test_tensor_bytes_counts_every_tensor_of_a_nested_state():
    state = {
        "a": torch.zeros(10, dtype=torch.float32),  # 40
        "b": [torch.zeros(3, dtype=torch.int64), (torch.zeros(2, 2, dtype=torch.float16), 5)],  # 24 + 8
        "c": "not a tensor",
    }
    assert checkpoints.tensor_bytes(state) == 40 + 24 + 8
    assert checkpoints.tensor_bytes(state) == tensors_bytes(state)


def test_clean_up_removes_only_our_partials_and_unreferenced_best_files(tmp_path):
    names = [
        ".checkpoint.th.a1.partial",
        ".best_state_2.th.b2.partial",
        ".notes.txt.c3.partial",
        "checkpoint.th",
        "best_state_1.th",
        "best_state_2.th",
        "best_state_12.th",
        "history.json",
    ]
    for name in names:
        (tmp_path / name).write_text("x")
    checkpoints.remove_partials(tmp_path)
    checkpoints.remove_unreferenced(tmp_path, keep="best_state_2.th")
    left = {".notes.txt.c3.partial", "checkpoint.th", "best_state_2.th", "history.json"}
    assert {p.name for p in tmp_path.iterdir()} == left
    checkpoints.remove_unreferenced(tmp_path, keep=None)
    assert {p.name for p in tmp_path.iterdir()} == left - {"best_state_2.th"}


def solver_after_epoch(tmp_path, epoch: int, epochs: int = 3, interval_s: float = 0):
    """A solver at the end of `epoch` of `epochs` (each the best so far), its weights a small module's: what
    save_checkpoints reads, without a run."""
    solver = bare_solver(
        {
            "optim": {"epochs": epochs},
            "checkpoint": {"save_last": True, "save_last_interval_s": interval_s, "save_every": 0},
        },
        tmp_path,
        history=[{"train": {"ce": 1.0}} for _ in range(epoch)],
    )
    solver.model = torch.nn.Linear(3, 2)
    solver.stateful.register("model", solver.model)
    solver.ema, solver.base_model = None, None
    solver.best_state_epoch, solver.best_file_epoch = epoch, None
    solver.checkpoint_writer = checkpoints.BackgroundWriter(solver.logger)
    solver.last_checkpoint_time = time.time()
    return solver


def test_the_checkpoint_holds_the_weights_of_its_epoch_while_the_next_one_trains(tmp_path, monkeypatch):
    """The write goes on in the background while the next epoch's optimizer steps change the weights in place:
    the file must hold the weights as they were when the epoch ended."""
    release = threading.Event()
    real_save = checkpoints.save

    def save_once_released(state, path):  # the write is slow: it starts after the next epoch's first step
        assert release.wait(timeout=60)
        real_save(state, path)

    monkeypatch.setattr(checkpoints, "save", save_once_released)
    solver = solver_after_epoch(tmp_path, epoch=1)
    at_epoch_end = {k: v.clone() for k, v in solver.model.state_dict().items()}
    solver.save_checkpoints()
    with torch.no_grad():  # the next epoch's first update, in place as AdamW's
        for parameter in solver.model.parameters():
            parameter.add_(1.0)
    release.set()
    solver.checkpoint_writer.wait()
    saved = torch.load(tmp_path / "checkpoint.th", weights_only=True)
    assert saved["model"].keys() == at_epoch_end.keys()
    for key, value in at_epoch_end.items():
        assert torch.equal(saved["model"][key], value), key
    assert saved["best_state"] == checkpoints.reference(1, in_file=False)
    assert solver.history[-1]["checkpoint"]["bytes"] == (3 * 2 + 2) * 4  # the weights' fp32 bytes


def test_the_save_interval_skips_epochs_but_never_the_last(tmp_path):
    """checkpoint.save_last_interval_s: an epoch ending a minute after the last write writes nothing, unless it
    ends the run."""
    middle = solver_after_epoch(tmp_path / "middle", epoch=2, interval_s=3600)
    middle.save_checkpoints()
    middle.checkpoint_writer.wait()
    assert middle.history[-1]["checkpoint"] == {"bytes": 0} and not (tmp_path / "middle" / "checkpoint.th").exists()
    last = solver_after_epoch(tmp_path / "last", epoch=3, interval_s=3600)
    last.save_checkpoints()
    last.checkpoint_writer.wait()
    assert last.history[-1]["checkpoint"]["bytes"] > 0 and (tmp_path / "last" / "checkpoint.th").is_file()


def test_a_past_best_epoch_is_written_to_its_file_once_and_older_ones_removed(tmp_path):
    """Epoch 1 stays the best while epochs 2 and 3 train: the first checkpoint after it writes best_state_1.th
    (and removes a best-state file nothing refers to any more), the next one only the checkpoint."""
    solver = solver_after_epoch(tmp_path, epoch=2, epochs=5)
    solver.best_state_epoch = 1
    best = {"weight": torch.full((2, 3), 0.5, dtype=torch.float16), "bias": torch.zeros(2, dtype=torch.float16)}
    solver.best_state = type("Best", (), {"state_dict": lambda self: {"model": best}})()
    (tmp_path / "best_state_0.th").write_bytes(b"an older best epoch's")
    checkpoint_bytes, best_bytes = (3 * 2 + 2) * 4, (3 * 2 + 2) * 2  # fp32 weights; the best state in fp16
    solver.save_checkpoints()
    solver.checkpoint_writer.wait()
    assert solver.history[-1]["checkpoint"]["bytes"] == checkpoint_bytes + best_bytes
    assert sorted(p.name for p in tmp_path.glob("best_state_*")) == ["best_state_1.th"]
    saved = safe_load(tmp_path / "best_state_1.th")
    assert saved["epoch"] == 1 and torch.equal(saved["best_state"]["model"]["weight"], best["weight"])
    assert safe_load(tmp_path / "checkpoint.th")["best_state"] == checkpoints.reference(1, in_file=True)
    solver.history.append({"train": {"ce": 1.0}})  # epoch 3
    solver.save_checkpoints()
    solver.checkpoint_writer.wait()
    assert solver.history[-1]["checkpoint"]["bytes"] == checkpoint_bytes
