"""Watching a run: TensorBoard events read back with TensorBoard's own reader, the epoch line with its ETA,
`make runs` (run.json, the run lock) and `make board` (TensorBoard served on localhost).

One tiny run (cpu_tiny, 2 epochs, samples at the last) is killed in the middle of epoch 2 and resumed by the same
command, as a preempted job would be: its curves must continue without a repeated or missing step."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import DATASET, PROCESS_HOOKS, REPO, TRAIN, run_tool, xp_folder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from musicgen_finetune import experiments, runs
from musicgen_finetune.experiments import RunLock

EPOCHS = 3  # conftest's resumed_run: cpu_tiny's epochs
EVERYTHING = {"scalars": 0, "audio": 0, "tensors": 0}  # 0: keep every event (the default samples them)


@pytest.fixture(scope="module")
def watched(resumed_run):
    """(experiment folder, updates per epoch, the killed run, the resumed run): conftest's resumed_run, killed in
    epoch 2 before its second update, so the first update of epoch 2 was logged by the run that died."""
    folder, killed, resumed = resumed_run
    updates = int(re.search(r"(\d+) updates per epoch", resumed.stderr).group(1))
    return folder, updates, killed, resumed


def events(path: Path) -> EventAccumulator:
    return EventAccumulator(str(path), size_guidance=EVERYTHING).Reload()


def steps(accumulator: EventAccumulator, tag: str) -> list:
    return [event.step for event in accumulator.Scalars(tag)]


def test_update_curves_continue_across_a_resume_without_repeat_or_gap(watched):
    folder, updates, _, _ = watched
    files = sorted((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # one per process: the killed run and the one that resumed it
    killed_file = events(files[0])
    # the killed run got past the end of epoch 1 (its checkpoint) before dying: what the resume must purge
    assert steps(killed_file, "update/loss") == list(range(1, updates + 2))
    board = events(folder / "tensorboard")
    expected = list(range(1, EPOCHS * updates + 1))
    assert steps(board, "update/loss") == expected
    assert steps(board, "update/lr") == expected
    assert steps(board, "update/grad_norm") == expected


def test_epoch_scalars_are_history_at_the_update_count(watched):
    folder, updates, killed, resumed = watched
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == EPOCHS
    board = events(folder / "tensorboard")
    tags = set(board.Tags()["scalars"])
    for stage in ("train", "valid"):
        for metric in ("ce", "ppl", "ce_q1", "ce_q2", "ce_q3", "ce_q4"):
            logged = board.Scalars(f"{stage}/{metric}")
            assert [e.step for e in logged] == [updates * (epoch + 1) for epoch in range(EPOCHS)]
            assert [e.value for e in logged] == pytest.approx([h[stage][metric] for h in history], rel=1e-6)
    # samples only at the last epoch (cpu_tiny: generate.every=1000)
    assert steps(board, "generate/rtf") == [EPOCHS * updates]
    assert board.Scalars("generate/rtf")[0].value == pytest.approx(history[-1]["generate"]["rtf"], rel=1e-6)
    for stage in ("train", "valid", "generate"):  # the stages' durations, under time/
        assert f"{stage}/duration" not in tags
    assert [e.value for e in board.Scalars("time/train")] == pytest.approx(
        [h["train"]["duration"] for h in history], rel=1e-6
    )
    # the token cache's hit rates, as the log counts them ("Cache hits, train epoch 1: tokens of 7/18 (39%) ...")
    log = killed.stderr + resumed.stderr
    counted = {
        int(e): int(h) / int(n) for e, h, n in re.findall(r"Cache hits, train epoch (\d+): tokens of (\d+)/(\d+)", log)
    }
    assert sorted(counted) == list(range(1, EPOCHS + 1))
    assert [e.value for e in board.Scalars("cache/train_tokens")] == pytest.approx(
        [counted[epoch] for epoch in sorted(counted)], rel=1e-6
    )
    assert steps(board, "cache/valid_tokens") == [updates * epoch for epoch in range(1, EPOCHS + 1)]
    assert "lora/adapter_norm" not in tags  # a full fine-tune


def test_samples_are_in_the_audio_tab_with_their_prompts(watched, tiny_model):
    folder, updates, _, _ = watched
    board = events(folder / "tensorboard")
    wavs = sorted((folder / "samples" / str(EPOCHS)).glob("*.wav"))
    assert len(wavs) == 2  # cpu_tiny: dataset.generate.num_samples
    sample_rate = torch.load(tiny_model / "state_dict.bin", weights_only=False)["xp.cfg"]
    sample_rate = int(re.search(r"^sample_rate: (\d+)$", sample_rate, re.MULTILINE).group(1))
    assert sorted(board.Tags()["audio"]) == sorted(f"generate/{wav.stem}" for wav in wavs)
    for wav in wavs:
        (audio,) = board.Audio(f"generate/{wav.stem}")
        assert audio.step == EPOCHS * updates and audio.sample_rate == sample_rate
        assert audio.length_frames > 0
        sidecar = json.loads(wav.with_suffix(".json").read_text())
        (text,) = board.Tensors(f"generate/{wav.stem}/prompt/text_summary")
        assert text.step == EPOCHS * updates
        assert text.tensor_proto.string_val[0].decode() == sidecar["conditioning"]["description"]


def test_each_epoch_says_how_long_the_run_has_left(watched):
    _, _, killed, resumed = watched
    assert re.search(r"Epoch 1/3 done in \d+ s; ETA \d+ s \(run\), 2 epochs to go", killed.stderr)
    assert re.search(r"Epoch 2/3 done in \d+ s; ETA \d+ s \(run\), 1 epoch to go", resumed.stderr)
    assert re.search(r"Epoch 3/3 done in \d+ s; ETA 0 s \(run\)\x1b\[0m$", resumed.stderr, re.MULTILINE)


def test_time_scalars_come_from_the_epochs_time_breakdown_when_it_has_one():
    """time/<stage>: a `time` entry of the epoch (train, valid, generate, checkpoint) when the solver records one,
    else the `duration` flashy measures for each stage; never a stage's duration as a metric of its own."""
    from musicgen_finetune.watch import epoch_scalars

    entry = {"train": {"ce": 3.5, "duration": 2.0}, "valid": {"ce": 4.0, "duration": 0.5}}
    assert epoch_scalars(entry) == {"train": {"ce": 3.5}, "valid": {"ce": 4.0}, "time": {"train": 2.0, "valid": 0.5}}
    breakdown = {"train": 2.1, "valid": 0.6, "checkpoint": 0.3}
    assert epoch_scalars({**entry, "time": breakdown})["time"] == breakdown


def test_logging_switches_leave_the_signature_alone():
    """Turning TensorBoard on or off is not another experiment (upstream's dora.exclude has logging.*,
    tensorboard.*: audiocraft config/config.yaml)."""
    from musicgen_finetune.train import main

    base = ["solver=finetune/cpu_tiny", "datasource.train=/d/train", "datasource.valid=/d/valid"]
    plain = main.get_xp(base).sig
    assert main.get_xp([*base, "logging.log_tensorboard=false"]).sig == plain
    assert main.get_xp([*base, "tensorboard.with_media_logging=false"]).sig == plain


def test_lora_runs_log_the_adapter_norm(workdir, tiny_model, dataset):
    out = workdir / "watch-lora-output"
    env = {"MUSICGEN_FT_OUTPUT": str(out), "AUDIOCRAFT_DORA_DIR": str(out)}
    command = [TRAIN, "--model", str(tiny_model), "--name", DATASET, "--preset", "finetune/cpu_tiny_lora"]
    result = run_tool([*command, "--args", "optim.epochs=1"], workdir, extra_env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = xp_folder(result)
    updates = int(re.search(r"(\d+) updates per epoch", result.stderr).group(1))
    adapters = torch.load(folder / "checkpoint.th", weights_only=True)["model"]  # a LoRA checkpoint: adapters only
    norm = torch.cat([tensor.flatten().double() for tensor in adapters.values()]).norm().item()
    (logged,) = events(folder / "tensorboard").Scalars("lora/adapter_norm")
    assert logged.step == updates and logged.value == pytest.approx(norm, rel=1e-6)


def fake_experiment(root: Path, name: str, state: str, epochs=(3, 5), lora=None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    history = [{"valid": {"ce": ce}} for ce in (5.0, 4.0, 4.5)[: epochs[0]]]
    runs.write_status(folder, state, history, epochs[1], "ce", "//pretrained//m/tiny", "/x/manifests/beats/train", lora)
    return folder


def test_runs_table_shows_how_each_run_stands(watched, tmp_path, workdir):
    folder, _, _, _ = watched
    root = tmp_path / "xps"
    root.mkdir()
    (root / folder.name).symlink_to(folder)  # the real run: completed
    running = fake_experiment(root, "aaaa0001", "running", lora={"rank": 4})
    fake_experiment(root, "aaaa0002", "running")  # says running, holds no lock: killed
    fake_experiment(root, "aaaa0003", "early_stop")
    fake_experiment(root, "aaaa0004", "paused", epochs=(1, 5))
    (root / "notarun").mkdir()  # a folder no run wrote to is not listed
    env = {"AUDIOCRAFT_DORA_DIR": str(tmp_path), "MUSICGEN_FT_OUTPUT": str(tmp_path)}
    with RunLock(running):  # this process trains it, as far as anyone can tell
        as_json = run_tool(["tools/runs.py", "--json"], workdir, extra_env=env)
        table = run_tool(["tools/runs.py"], workdir, extra_env=env)
    assert as_json.returncode == 0 and table.returncode == 0, as_json.stderr + table.stderr
    rows = {row["signature"]: row for row in json.loads(as_json.stdout)}
    assert {name: row["state"] for name, row in rows.items()} == {
        folder.name: "completed",
        "aaaa0001": "running",
        "aaaa0002": "interrupted",
        "aaaa0003": "early_stop",
        "aaaa0004": "paused",
    }
    history = json.loads((folder / "history.json").read_text())
    best = min(range(len(history)), key=lambda i: history[i]["valid"]["ce"])
    real = rows[folder.name]
    assert (real["epochs_done"], real["epochs_planned"]) == (EPOCHS, EPOCHS)
    assert (real["lora"], real["dataset"]) == (None, DATASET)
    assert (real["best_epoch"], real["best_valid"]) == (best + 1, history[best]["valid"]["ce"])
    assert rows["aaaa0003"]["best_epoch"] == 2 and rows["aaaa0003"]["best_valid"] == 4.0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["signature", "model", "dataset", "kind", "epochs", "best", "valid", "state", "folder"]
    line = next(line for line in lines if line.startswith("aaaa0001"))
    assert line.split() == ["aaaa0001", "tiny", "beats", "LoRA", "r4", "3/5", "2", "ce", "4.0000", "running"] + [
        str(running)
    ]


def test_runs_reads_a_hundred_experiments(tmp_path):
    for index in range(100):
        fake_experiment(tmp_path, f"xp{index:04d}", "completed")
    rows = runs.read_runs(tmp_path)
    assert len(rows) == 100 and {row["state"] for row in rows} == {"completed"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_board_serves_the_runs_on_localhost(watched, workdir):
    """make board: TensorBoard on a free port of localhost lists the run, and nothing reaches the network."""
    folder, _, _, _ = watched
    port = free_port()
    guard = workdir / "board_network_attempts.log"
    out = str(folder.parent.parent)
    env = {
        **os.environ,
        "MUSICGEN_FT_OUTPUT": out,
        "AUDIOCRAFT_DORA_DIR": out,
        "PYTHONPATH": os.pathsep.join([str(PROCESS_HOOKS), str(REPO)]),  # the network guard (conftest.run_tool)
        "NETWORK_GUARD_LOG": str(guard),
    }
    board = subprocess.Popen(
        [sys.executable, "tools/board.py", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # TensorBoard's own warnings (the purged steps of the killed run)
        text=True,
    )
    try:
        line = board.stdout.readline()
        assert line.startswith("TensorBoard over ") and f"http://127.0.0.1:{port}/" in line, line
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "<title>TensorBoard</title>" in page
        deadline = time.time() + 60
        while time.time() < deadline:  # TensorBoard finds the event files in the background after it starts
            listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=30).read())
            if listed:
                break
            time.sleep(0.5)
        assert listed == [f"{folder.name}/tensorboard"]
    finally:
        board.kill()
        board.wait()
    assert not guard.exists() or guard.read_text() == ""  # offline


def test_board_says_a_resumed_runs_purge_is_not_an_error(watched, caplog):
    """TensorBoard's reader (the one make board runs, --load_fast=false) warns "out of order event ... TensorFlow
    restart" when it drops what the killed process logged past its checkpoint; make board says what it is."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    from musicgen_finetune import board

    folder, updates, _, _ = watched
    tensorboard_logger = logging.getLogger("tensorboard")
    with caplog.at_level(logging.INFO, logger="tensorboard"):
        plugin_event_accumulator.EventAccumulator(str(folder / "tensorboard")).Reload()
    assert "out of order event" in caplog.text  # TensorBoard's own line, without make board
    caplog.clear()
    board.explain_resumed_runs()
    try:
        with caplog.at_level(logging.INFO, logger="tensorboard"):
            plugin_event_accumulator.EventAccumulator(str(folder / "tensorboard")).Reload()
    finally:
        tensorboard_logger.filters = [f for f in tensorboard_logger.filters if not isinstance(f, board.ResumedRunNote)]
    assert "out of order" not in caplog.text and "TensorFlow" not in caplog.text
    # the killed process logged update updates + 1 (the first of epoch 2) on three update/ tags; all of it replaced
    [record] = [r for r in caplog.records if "a resumed run" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith(f"a resumed run: 3 values logged from update {updates + 1} on by the process")


def test_runs_rows_and_table_in_this_process(tmp_path):
    """The runs table's rows as `make runs` reads them, without a tool process (make mutate sees these)."""
    running = fake_experiment(tmp_path, "aaaa0001", "running", lora={"rank": 4})
    killed = fake_experiment(tmp_path, "aaaa0002", "running")  # says running, holds no lock
    stopped = fake_experiment(tmp_path, "aaaa0003", "early_stop")
    fake_experiment(tmp_path, "aaaa0004", "paused", epochs=(1, 5))
    fake_experiment(tmp_path, "aaaa0005", "running", epochs=(0, 5))  # no validation yet
    (tmp_path / "notarun").mkdir()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "run.json").write_text('{"state": "comp')  # not ours, or not JSON: left out
    (tmp_path / "a-file").write_text("x")
    status = json.loads((stopped / "run.json").read_text())
    (stopped / "run.json").write_text(json.dumps({**status, "updated": "2999-01-01T00:00:00"}))  # the newest
    with RunLock(running):
        assert experiments.is_running(running) and not experiments.is_running(killed)
        rows = runs.read_runs(tmp_path)
    assert not experiments.is_running(running) and not experiments.is_running(tmp_path / "notarun")
    assert [row["signature"] for row in rows][0] == "aaaa0003"
    by_name = {row["signature"]: row for row in rows}
    assert {name: row["state"] for name, row in by_name.items()} == {
        "aaaa0001": "running",
        "aaaa0002": "interrupted",
        "aaaa0003": "early_stop",
        "aaaa0004": "paused",
        "aaaa0005": "interrupted",
    }
    # (5.0, 4.0, 4.5): epoch 2 is the best; the model without its //pretrained/ prefix, the dataset by its folder
    assert {k: by_name["aaaa0003"][k] for k in ("epochs_done", "epochs_planned", "best_epoch", "best_valid")} == {
        "epochs_done": 3,
        "epochs_planned": 5,
        "best_epoch": 2,
        "best_valid": 4.0,
    }
    assert (by_name["aaaa0003"]["model"], by_name["aaaa0003"]["dataset"], by_name["aaaa0003"]["metric"]) == (
        "/m/tiny",
        "beats",
        "ce",
    )
    assert by_name["aaaa0003"]["folder"] == str(stopped) and by_name["aaaa0001"]["lora"] == {"rank": 4}
    assert (by_name["aaaa0005"]["best_epoch"], by_name["aaaa0005"]["best_valid"]) == (None, None)

    lines = runs.format_table(rows).splitlines()
    header = lines[0]
    assert header.split() == list(runs.COLUMNS)
    lora_line = next(line for line in lines if line.startswith("aaaa0001"))
    assert lora_line.split() == ["aaaa0001", "tiny", "beats", "LoRA", "r4", "3/5", "2", "ce", "4.0000", "running"] + [
        str(running)
    ]
    assert lora_line.index("tiny") == header.index("model") and lora_line.index("3/5") == header.index("epochs")
    assert lora_line.index(str(running)) == header.index("folder")
    fresh = next(line for line in lines if line.startswith("aaaa0005")).split()
    assert fresh[1:] == ["tiny", "beats", "full", "0/5", "-", "-", "interrupted", str(tmp_path / "aaaa0005")]
    assert all(line == line.rstrip() for line in lines)
    assert runs.format_table([]).startswith("No experiments in ")


def test_dataset_names_from_manifests():
    assert runs.dataset_name("/x/manifests/beats/train") == "beats"
    assert runs.dataset_name("/x/manifests/.versions/beats/20261207T101010/valid") == "beats"  # as a run pins it
    assert runs.dataset_name("/x/manifests/beats/valid.jsonl") == "beats"
    assert runs.dataset_name("/x/manifests/beats") == "beats"
    assert runs.dataset_name(None) is None and runs.dataset_name("") is None


def test_done_and_history_files_and_finding_an_experiment(tmp_path, monkeypatch):
    folder = tmp_path / "xps" / "abcd1234"
    folder.mkdir(parents=True)
    assert experiments.read_done(folder) is None and experiments.read_history(folder) == []
    history = [{"valid": {"ce": 2.0}}, {"valid": {"ce": 1.0}}, {"valid": {"ce": 1.5}}]
    (folder / "history.json").write_text(json.dumps(history))
    assert experiments.read_history(folder) == history
    experiments.write_done(folder, "early_stop", history, "ce")
    assert experiments.read_done(folder) == {
        "reason": "early_stop",
        "epochs": 3,
        "best_epoch": 2,
        "metric": "ce",
        "forgetting_budget": None,
        "best_reason": "lowest valid ce",
    }
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path))
    with pytest.raises(experiments.ExperimentNotFoundError, match=r"XP=abcd1234: no checkpoint\.th in .*: none"):
        experiments.find_experiment("abcd1234")
    (folder / "checkpoint.th").write_bytes(b"")
    assert experiments.find_experiment("abcd1234") == folder.resolve()
    assert experiments.find_experiment(str(folder)) == folder.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(experiments.ExperimentNotFoundError, match="Experiments with a checkpoint: abcd1234 "):
        experiments.find_experiment(elsewhere)


def test_run_status_keeps_the_metric_and_budget_and_old_files_read_as_ce(tmp_path, monkeypatch):
    # acc falls while ce rises: the best epoch by acc is the last, by ce the first; within a 10% budget, the second
    history = [
        {"valid": {"ce": 1.0, "acc": 0.9, "prior_ce": 2.0, "prior_ce_base": 2.0}},
        {"valid": {"ce": 1.1, "acc": 0.5, "prior_ce": 2.1, "prior_ce_base": 2.0}},
        {"valid": {"ce": 1.2, "acc": 0.1, "prior_ce": 3.0, "prior_ce_base": 2.0}},
    ]
    runs.write_status(tmp_path / "a", "completed", history, 3, "acc", None, None, None)
    runs.write_status(tmp_path / "b", "completed", history, 3, "acc", None, None, None, forgetting_budget=0.1)
    rows = {row["signature"]: row for row in runs.read_runs(tmp_path)}
    assert (rows["a"]["metric"], rows["a"]["best_epoch"], rows["a"]["best_valid"]) == ("acc", 3, 0.1)
    assert (rows["b"]["best_epoch"], rows["b"]["best_valid"]) == (2, 0.5)
    assert rows["a"]["updated"] and rows["a"]["model"] is None and rows["a"]["dataset"] is None
    line = runs.format_table([rows["a"]]).splitlines()[1].split()
    assert line[1:4] == ["-", "-", "full"] and line[6:8] == ["acc", "0.1000"]
    # a run.json from before the metric was written, and one without a time: ce, and listed last
    status = json.loads((tmp_path / "a" / "run.json").read_text())
    del status["metric"], status["updated"]
    (tmp_path / "a" / "run.json").write_text(json.dumps(status))
    rows = runs.read_runs(tmp_path)
    assert [row["signature"] for row in rows] == ["b", "a"] and rows[1]["metric"] == "ce"
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path.parent))  # read_runs() reads <dora dir>/xps
    (tmp_path.parent / "xps").mkdir(exist_ok=True)
    runs.write_status(tmp_path.parent / "xps" / "c", "running", history, 3, "ce", None, None, None)
    assert [row["signature"] for row in runs.read_runs()] == ["c"]


def test_done_file_and_best_epoch_follow_the_forgetting_budget(tmp_path):
    history = [
        {"valid": {"ce": 2.0, "prior_ce": 2.0, "prior_ce_base": 2.0}},
        {"valid": {"ce": 1.0, "prior_ce": 2.5, "prior_ce_base": 2.0}},  # +25%: exactly at a 25% budget, within it
    ]
    assert experiments.best_epoch(history) == 2 and experiments.best_epoch(history, "ce", 0.1) == 1
    assert "over budget" not in experiments.choose_best(history, "ce", 0.25).reason
    assert experiments.best_epoch(history, "ce", 0.25) == 2
    experiments.write_done(tmp_path, "completed", history, "ce", 0.1)
    done = experiments.read_done(tmp_path)
    assert (done["best_epoch"], done["forgetting_budget"]) == (1, 0.1)
    assert "over budget: epoch(s) 2" in done["best_reason"]


def test_finding_an_experiment_by_a_relative_folder_and_naming_the_others(tmp_path, monkeypatch):
    for name in ("bbbb0002", "aaaa0001"):
        (tmp_path / "xps" / name).mkdir(parents=True)
        (tmp_path / "xps" / name / "checkpoint.th").write_bytes(b"")
    monkeypatch.setenv("AUDIOCRAFT_DORA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert experiments.find_experiment("xps/aaaa0001") == tmp_path / "xps" / "aaaa0001"
    with pytest.raises(experiments.ExperimentNotFoundError) as missing:
        experiments.find_experiment("cccc0003")
    assert str(missing.value) == (
        f"XP=cccc0003: no checkpoint.th in {tmp_path / 'xps' / 'cccc0003'}. Experiments with a checkpoint: "
        "aaaa0001, bbbb0002 (make train prints the signature)."
    )
