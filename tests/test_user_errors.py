"""What a user gets for a mistake: one `error:` line naming the key, value or file and the fix, exit status 2, no
traceback, and nothing left behind. Most checks run in-process (the same functions the tools call); one of each
kind goes through the real tool, as `make` runs it."""

import json
import shutil

import pytest
import torch
from conftest import DATASET, TRAIN, one_error_line, run_tool

from musicgen_finetune import UserError, experiments_dir, launch, manifests_root
from musicgen_finetune.config import OverrideError
from musicgen_finetune.data.manifests import DatasetError, ManifestOptions, build_manifests


def plan(model, extra, preset="finetune/cpu_tiny"):
    return launch.plan(str(model), DATASET, preset=preset, extra=extra)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.epoch=2", "optim.epoch: no such key; did you mean optim.epochs?"),
        ("optim.lrr=1e-4", "optim.lrr: no such key; did you mean optim.lr"),
        ("epochs=2", "epochs: no such key; did you mean optim.epochs?"),
    ],
)
def test_an_unknown_key_names_the_closest_ones(tiny_model, dataset, override, expected):
    with pytest.raises(OverrideError) as refused:
        plan(tiny_model, [override])
    assert str(refused.value).startswith(expected)
    assert "+" not in str(refused.value)  # never Hydra's advice to append a key nothing reads


def test_an_unknown_lora_key_names_lora_rank(tiny_model, dataset):
    with pytest.raises(OverrideError, match=r"^lora\.rnak: no such key; did you mean lora\.rank\?"):
        plan(tiny_model, ["lora.rnak=8"], preset="finetune/cpu_tiny_lora")


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("optim.epochs=two", "optim.epochs=two: must be a whole number >= 1"),
        ("optim.epochs=0", "optim.epochs=0: must be a whole number >= 1"),
        ("optim.epochs=2.5", "optim.epochs=2.5: must be a whole number >= 1"),
        ("optim.lr=-1e-4", "optim.lr=-0.0001: must be a number >= 0"),
        ("optim.lr=fast", "optim.lr=fast: must be a number >= 0"),
        ("dataset.batch_size=0", "dataset.batch_size=0: must be a whole number >= 1"),
        ("dataset.segment_duration=0", "dataset.segment_duration=0: must be a number > 0"),
        ("optim.grad_accum_steps=0", "optim.grad_accum_steps=0: must be a whole number >= 1"),
        ("lora.rank=0", "lora.rank=0: must be a whole number >= 1"),
        ("lora.alpha=0", "lora.alpha=0: must be a number > 0"),
        ("lora.dropout=1.5", "lora.dropout=1.5: must be a number >= 0 and < 1"),
    ],
)
def test_a_value_out_of_range_is_named_with_what_is_allowed(tiny_model, dataset, override, allowed):
    with pytest.raises(OverrideError) as refused:
        plan(tiny_model, [override], preset="finetune/cpu_tiny_lora")
    assert allowed in str(refused.value)


def test_lora_targets_are_checked_before_training(tiny_model, dataset):
    with pytest.raises(UserError, match="lora.targets"):
        plan(tiny_model, ["lora.targets=everything"], preset="finetune/cpu_tiny_lora")


def test_a_bad_override_through_make_train_leaves_nothing_behind(workdir, tiny_model, dataset):
    before = sorted(experiments_dir().glob("*")) if experiments_dir().is_dir() else []
    result = run_tool(
        [
            TRAIN,
            "--model",
            str(tiny_model),
            "--name",
            DATASET,
            "--preset",
            "finetune/cpu_tiny",
            "--args",
            "optim.epochs=two",
        ],
        workdir,
    )
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith("error: optim.epochs=two: must be a whole number >= 1")
    assert "Running: dora" not in result.stdout and "resumes" not in result.stderr
    assert (sorted(experiments_dir().glob("*")) if experiments_dir().is_dir() else []) == before
    typo = run_tool(
        [
            TRAIN,
            "--model",
            str(tiny_model),
            "--name",
            DATASET,
            "--preset",
            "finetune/cpu_tiny",
            "--args",
            "optim.epoch=2",
        ],
        workdir,
    )
    assert typo.returncode == 2
    assert one_error_line(typo.stderr) == "error: optim.epoch: no such key; did you mean optim.epochs?"


def test_no_gpu_names_the_cpu_presets(tiny_model, dataset, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(launch.LaunchError) as refused:
        plan(tiny_model, [], preset="finetune/musicgen_small")
    assert "PRESET=finetune/cpu_tiny" in str(refused.value) and "finetune/cpu_tiny_lora" in str(refused.value)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"segment": 0}, "SEGMENT=0: must be a number of seconds >= 1"),
        ({"segment": -1}, "SEGMENT=-1: must be a number of seconds >= 1"),
        ({"valid": 1.5}, "VALID=1.5: must be a fraction in [0, 1)"),
        ({"valid": -0.1}, "VALID=-0.1: must be a fraction in [0, 1)"),
        ({"valid": 0}, "VALID=0: training validates after every epoch"),
        ({"seed": 1.5}, "SPLIT_SEED=1.5: must be a whole number"),
    ],
)
def test_manifest_settings_are_checked_before_anything_is_written(beats, options, named):
    with pytest.raises(DatasetError) as refused:
        build_manifests(beats, "refused", ManifestOptions(**options))
    assert named in str(refused.value)
    assert not (manifests_root() / "refused").exists() and not (manifests_root() / ".versions" / "refused").exists()


def test_make_manifests_names_the_variable_of_a_bad_number(beats, workdir):
    for flag, value, variable in (
        ("--segment", "0", "SEGMENT=0"),
        ("--valid", "1.5", "VALID=1.5"),
        ("--seed", "abc", "SPLIT_SEED=abc"),
        ("--segment", "long", "SEGMENT=long"),
    ):
        result = run_tool(["tools/manifests.py", "--data", str(beats), "--name", "refused", flag, value], workdir)
        assert result.returncode == 2 and one_error_line(result.stderr).startswith(f"error: {variable}: must be")
    assert not (manifests_root() / "refused").exists()


def test_a_folder_without_captions_suggests_text(tmp_path, beats):
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    for wav in sorted(beats.rglob("*.wav"))[:3]:
        shutil.copy(wav, folder / wav.name)
    with pytest.raises(DatasetError) as refused:
        build_manifests(folder, "uncaptioned", ManifestOptions(segment=1.0))
    assert "none of its 3 audio files has a caption" in str(refused.value) and "TEXT=" in str(refused.value)
    captioned = build_manifests(folder, "uncaptioned", ManifestOptions(segment=1.0, text="hip hop 808 beat"))
    assert json.loads((captioned / "report.json").read_text())["files_used"] == 3


def test_make_listen_names_the_report_folder(workdir, tmp_path):
    result = run_tool(["tools/listen.py", str(tmp_path / "no-report"), "--port", "0"], workdir)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"REPORT={tmp_path / 'no-report'}" in line and "make eval" in line


# -- a model folder holding a file that would need arbitrary code to unpickle ---------------------------------


class Payload:
    """Unpickling this would run os.system; torch's safe loader must refuse it unread."""

    def __reduce__(self):
        import os

        return os.system, ("echo unsafe-code-ran",)


@pytest.fixture(scope="module")
def unsafe_model(tiny_model, tmp_path_factory):
    model = tmp_path_factory.mktemp("unsafe") / "tiny-musicgen"
    shutil.copytree(tiny_model, model)
    package = torch.load(model / "state_dict.bin", weights_only=True)
    torch.save({**package, "note": Payload()}, model / "state_dict.bin")
    return model


def assert_refused_as_unsafe(result, model):
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr)
    assert f"{model / 'state_dict.bin'} needs arbitrary code to unpickle" in line
    assert "unsafe-code-ran" not in result.stdout + result.stderr


def test_unsafe_model_refused_by_make_train(unsafe_model, workdir, dataset):
    result = run_tool(
        [TRAIN, "--model", str(unsafe_model), "--name", DATASET, "--preset", "finetune/cpu_tiny"], workdir
    )
    assert_refused_as_unsafe(result, unsafe_model)


@pytest.mark.long  # the safe loader again, through another tool (make train's: above)
def test_unsafe_model_refused_by_make_generate(unsafe_model, workdir, tmp_path):
    result = run_tool(
        [
            "tools/generate.py",
            "--model",
            str(unsafe_model),
            "--prompts",
            "808 beat",
            "--out",
            str(tmp_path / "samples"),
        ],
        workdir,
    )
    assert_refused_as_unsafe(result, unsafe_model)
    assert not (tmp_path / "samples").exists()


@pytest.mark.long  # the safe loader again, through another tool (make train's: above)
def test_unsafe_model_refused_by_make_eval(unsafe_model, tiny_model, workdir, dataset, tmp_path):
    result = run_tool(
        [
            "tools/eval.py",
            "--base",
            str(unsafe_model),
            "--tuned",
            str(tiny_model),
            "--name",
            DATASET,
            "--out",
            str(tmp_path / "report"),
        ],
        workdir,
    )
    assert_refused_as_unsafe(result, unsafe_model)
    assert not (tmp_path / "report").exists()


@pytest.mark.long  # the safe loader again, through another tool (make train's: above)
def test_unsafe_base_refused_by_make_export(tiny_model, workdir, dataset, tmp_path):
    """An experiment whose base model folder now holds an unsafe file: export reads it, and refuses it."""
    model = tmp_path / "base"
    shutil.copytree(tiny_model, model)
    trained = run_tool(
        [
            TRAIN,
            "--model",
            str(model),
            "--name",
            DATASET,
            "--preset",
            "finetune/cpu_tiny",
            "--args",
            "optim.epochs=1",
        ],
        workdir,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    package = torch.load(model / "state_dict.bin", weights_only=True)
    torch.save({**package, "note": Payload()}, model / "state_dict.bin")
    xp = next(line.split()[1].rstrip(":") for line in trained.stdout.splitlines() if line.startswith("Experiment "))
    result = run_tool(["tools/export.py", "--xp", xp, "--out", str(tmp_path / "export")], workdir)
    assert_refused_as_unsafe(result, model)
    assert not (tmp_path / "export").exists()
