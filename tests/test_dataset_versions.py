"""A run's data is fixed for its life (data/versions.py): `make manifests` builds a new version beside the one being
read, refuses while a run reads it unless FORCE=1, and a resumed run whose dataset changed refuses."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TRAIN, one_error_line, run_tool, tool_env

from musicgen_finetune.data import versions
from musicgen_finetune.data.manifests import ManifestOptions, build_manifests
from musicgen_finetune.data.versions import DatasetInUseError, Pin, content_hash, read_version


def rows(out: Path, split: str = "train"):
    return [json.loads(line) for line in (out / split / "data.jsonl").read_text().splitlines() if line.strip()]


def version_folders(out: Path):
    return sorted(p.name for p in (out.parent / ".versions" / out.name).iterdir() if p.is_dir())


def test_the_same_data_built_twice_or_elsewhere_is_one_version_and_other_data_another(beats, tmp_path):
    options = ManifestOptions(segment=1.0, valid=0.25, workers=1)
    out = build_manifests(beats, "same", options, out_root=tmp_path / "a")
    first = out.resolve()
    first_hash = read_version(first)["hash"]
    assert out.is_symlink() and first.parent == tmp_path / "a" / ".versions" / "same"
    assert read_version(first)["hash"] == content_hash(first)
    assert all(Path(r["path"]).is_relative_to(first) for r in rows(out))  # the version's own files, not the link's

    again = build_manifests(beats, "same", options, out_root=tmp_path / "a")
    assert again.resolve() == first and version_folders(out) == [first.name]  # nothing new, nothing left over

    elsewhere = build_manifests(beats, "same", options, out_root=tmp_path / "b")
    assert read_version(elsewhere.resolve())["hash"] == first_hash  # paths are not content

    other = build_manifests(beats, "same", ManifestOptions(segment=1.5, valid=0.25, workers=1), out_root=tmp_path / "a")
    assert other.resolve() != first and read_version(other.resolve())["hash"] != first_hash
    assert version_folders(out) == [other.resolve().name]  # the old version, read by nobody, is gone


def test_a_changed_sidecar_or_audio_byte_changes_the_hash(beats, tmp_path):
    out = build_manifests(beats, "bytes", ManifestOptions(segment=1.0, valid=0.25, workers=1), out_root=tmp_path)
    root = out.resolve()
    before = content_hash(root)
    (root / "report.json").write_text("{}")  # a report, not data
    assert content_hash(root) == before
    wav = Path(rows(out)[0]["path"])
    data = bytearray(wav.read_bytes())
    data[-1] ^= 1
    wav.write_bytes(bytes(data))
    assert content_hash(root) != before
    wav.with_suffix(".json").write_text(wav.with_suffix(".json").read_text().replace("808", "909"))
    data[-1] ^= 1
    wav.write_bytes(bytes(data))
    assert content_hash(root) != before


def test_a_version_being_read_is_kept_and_a_rebuild_needs_force(beats, tmp_path):
    out = build_manifests(beats, "read", ManifestOptions(segment=1.0, valid=0.25, workers=1), out_root=tmp_path)
    v1, v1_rows = out.resolve(), rows(out)
    reader = Pin(v1)  # what a training process holds for its life
    shorter = ManifestOptions(segment=1.5, valid=0.25, workers=1)
    with pytest.raises(DatasetInUseError, match="FORCE=1"):
        build_manifests(beats, "read", shorter, out_root=tmp_path)
    assert out.resolve() == v1

    build_manifests(beats, "read", shorter, out_root=tmp_path, force=True)
    v2 = out.resolve()
    assert v2 != v1 and sorted(version_folders(out)) == sorted([v1.name, v2.name])
    assert all(Path(r["path"]).is_file() for r in v1_rows)  # the reader's files are all still there
    assert read_version(v1)["hash"] != read_version(v2)["hash"]

    reader.lock.close()  # the run ended
    build_manifests(beats, "read", ManifestOptions(segment=2.0, valid=0.25, workers=1), out_root=tmp_path)
    assert not v1.exists() and not v2.exists() and len(version_folders(out)) == 1


def test_a_dataset_from_before_versions_is_replaced_by_a_version(beats, tmp_path):
    out = build_manifests(beats, "legacy", ManifestOptions(segment=1.0, valid=0.25, workers=1), out_root=tmp_path)
    old = out.resolve()
    out.unlink()
    shutil.move(old, out)  # a plain folder, as `make manifests` wrote before versions
    (out / "version.json").unlink()
    build_manifests(beats, "legacy", ManifestOptions(segment=1.5, valid=0.25, workers=1), out_root=tmp_path)
    assert out.is_symlink() and read_version(out.resolve()) and len(version_folders(out)) == 1


def test_pinning_resolves_every_split_once_and_leaves_other_folders(beats, tmp_path):
    out = build_manifests(beats, "pin", ManifestOptions(segment=1.0, valid=0.25, workers=1), out_root=tmp_path)
    own = tmp_path / "own"
    (own / "train").mkdir(parents=True)
    datasource = {"train": str(out / "train"), "valid": str(out / "valid"), "evaluate": str(own / "train"), "x": 3}
    pins = versions.pin_splits(datasource)
    assert [p.root for p in pins] == [out.resolve()]
    assert datasource == {
        "train": str(out.resolve() / "train"),
        "valid": str(out.resolve() / "valid"),
        "evaluate": str(own / "train"),
        "x": 3,
    }
    assert versions.readers_busy(out.resolve())
    assert pins[0].record() == {
        "name": "pin",
        "hash": read_version(out.resolve())["hash"],
        "version": str(out.resolve()),
    }


def test_changed_names_each_dataset_whose_hash_differs():
    saved = [{"name": "a", "hash": "1", "version": "/a1"}, {"name": "b", "hash": "2", "version": "/b2"}]
    now = [{"name": "a", "hash": "1", "version": "/a1"}, {"name": "b", "hash": "3", "version": "/b3"}]
    assert versions.changed(saved, now) == [(saved[1], now[1])]
    assert versions.changed(saved, now[:1]) == [(saved[1], None)]
    assert versions.changed([{"name": None, "hash": None, "version": "/own"}], []) == []


def wait_for(condition, seconds: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {seconds} s")
        time.sleep(0.5)


def test_rebuilding_under_a_running_experiment_refuses_then_force_keeps_its_data_and_resuming_refuses(
    workdir, tiny_model, beats
):
    """Real `make train` (tools/train.py) and `make manifests` processes: while the run trains on NAME, a rebuild
    names the experiment and refuses; FORCE=1 builds beside it; the run, killed after its first checkpoint and
    started again by the same command, refuses with both hashes and the two ways out."""
    out_dir = workdir / "versions-output"
    env = {"MUSICGEN_FT_OUTPUT": str(out_dir), "AUDIOCRAFT_DORA_DIR": str(out_dir)}
    manifests = ["tools/manifests.py", "--data", str(beats), "--name", "moving"]
    assert run_tool([*manifests, "--segment", "1", "--valid", "0.25"], workdir, env).returncode == 0
    first = (workdir / "manifests" / "moving").resolve()
    command = [TRAIN, "--model", str(tiny_model), "--name", "moving", "--preset", "finetune/cpu_tiny"]
    command += ["--args", "optim.epochs=200"]
    run = subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO,
        env=tool_env(workdir, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        xps = out_dir / "xps"
        wait_for(lambda: any(xps.glob("*/checkpoint.th")), 600, "checkpoint", run)
        xp = next(xps.glob("*/checkpoint.th")).parent
        assert json.loads((xp / "datasets.json").read_text())[0]["version"] == str(first)

        refused = run_tool([*manifests, "--segment", "1", "--valid", "0.5"], workdir, env)
        assert refused.returncode == 2
        assert xp.name in one_error_line(refused.stderr) and "FORCE=1" in refused.stderr
        assert (workdir / "manifests" / "moving").resolve() == first

        forced = run_tool([*manifests, "--segment", "1", "--valid", "0.5", "--force"], workdir, env)
        assert forced.returncode == 0, forced.stderr[-3000:]
        second = (workdir / "manifests" / "moving").resolve()
        assert second != first and first.is_dir()  # the running experiment's version stays
        assert run.poll() is None
    finally:
        run.send_signal(signal.SIGKILL)
        run.communicate()
    resumed = run_tool(command, workdir, env)
    assert resumed.returncode == 2, resumed.stdout[-3000:]
    line = one_error_line(resumed.stderr)
    old_hash, new_hash = read_version(first)["hash"], read_version(second)["hash"]
    assert old_hash[:16] in line and new_hash[:16] in line and "FRESH=1" in line
    assert json.loads((xp / "datasets.json").read_text())[0]["version"] == str(first)  # what it trained on, still
    # another setting (a new signature: a new experiment, as a rebuild with another SEGMENT gives) starts on the new
    # data and says that the earlier experiment trained on the earlier version
    other = run_tool([*command[:-1], "optim.epochs=1"], workdir, env)
    assert other.returncode == 0, other.stderr[-3000:]
    [warning] = [line for line in other.stderr.splitlines() if "was rebuilt since experiment" in line]
    assert f"NAME=moving was rebuilt since experiment {xp.name} trained on it (content hash {old_hash[:16]})" in warning
    assert f"trains on the new data ({new_hash[:16]})" in warning
