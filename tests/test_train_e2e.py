"""End to end: the real `dora run`, through `tools/train.py` in a subprocess, on the tiny model, offline, no USER."""

import json
import math
import re

import pytest
import torch
from conftest import DATASET, TRAIN, one_error_line, run_tool, train, xp_folder

from musicgen_finetune.checkpoints import resolve_best_state


def test_fine_tune_writes_checkpoint_history_and_samples(first_run):
    folder = xp_folder(first_run)
    assert folder.parent.name == "xps" and folder.parent.parent.name == "output"
    assert (folder / "checkpoint.th").is_file()
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 3
    for epoch in history:
        assert math.isfinite(epoch["train"]["ce"]) and math.isfinite(epoch["valid"]["ce"])
    assert history[-1]["train"]["ce"] < history[0]["train"]["ce"]  # it learned something
    assert list((folder / "samples").rglob("*.wav")), "the last epoch generates samples to listen to"


def test_log_says_what_was_loaded_trained_and_written(first_run, tiny_model):
    snapshot = torch.load(tiny_model / "state_dict.bin", weights_only=True)
    tensors = len(snapshot["best_state"])
    log = first_run.stderr + first_run.stdout
    assert (
        f"Loaded pretrained LM weights from {tiny_model / 'state_dict.bin'}: {tensors} of {tensors} tensors "
        "matched" in log
    )
    assert f"T5 from {tiny_model / 't5'}" in log
    assert re.search(r"Training [\d,]+ of [\d,]+ LM parameters", log)
    assert "Checkpoint: " in log and "samples: " in log


def test_run_makes_no_network_call(first_run, workdir):
    log = workdir / "network_attempts.log"
    assert not log.exists() or log.read_text() == ""


def test_network_guard_catches_a_connection(workdir):
    """The guard above must be able to fail: a process that tries the network is caught and logged."""
    log = workdir / "guard_check.log"
    result = run_tool(
        ["-c", "import urllib.request; urllib.request.urlopen('http://example.com', timeout=2)"],
        workdir,
        extra_env={"NETWORK_GUARD_LOG": str(log)},
    )
    assert result.returncode != 0 and "example.com" in log.read_text()


def test_rerun_resumes_instead_of_restarting(first_run, workdir, tiny_model):
    folder = xp_folder(first_run)
    history_before = (folder / "history.json").read_text()
    again = train(workdir, tiny_model)
    assert again.returncode == 0, again.stderr[-3000:]
    assert xp_folder(again) == folder  # same overrides, same signature
    log = again.stderr + again.stdout
    assert f"Loading existing checkpoint: {folder / 'checkpoint.th'}" in log
    assert "Train | Epoch" not in log  # nothing retrained
    assert "had already ended (completed" in again.stdout and "nothing was trained" in again.stdout
    assert (folder / "history.json").read_text() == history_before


def test_weights_at_step_zero_are_the_snapshot(workdir, tiny_model, dataset):
    """Fine-tuning, not training from scratch: with lr=0 the trained weights are exactly the snapshot's."""
    result = train(workdir, tiny_model, args="optim.lr=0 schedule.lr_scheduler=null optim.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = torch.load(xp_folder(result) / "checkpoint.th", weights_only=True)["model"]
    snapshot = torch.load(tiny_model / "state_dict.bin", weights_only=True)["best_state"]
    assert trained.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(trained[key], value.to(trained[key].dtype)), key


def test_dora_info_knows_the_experiment(first_run, workdir):
    folder = xp_folder(first_run)
    command = re.search(r"^Running: dora -P musicgen_finetune run (.*)$", first_run.stdout, re.MULTILINE).group(1)
    result = run_tool(["-m", "dora", "-P", "musicgen_finetune", "info", *command.split()], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder.name in result.stdout + result.stderr


# make train's refusals before any run, in this process (how a tool prints a refusal: test_user_errors.py)
def test_bad_model_folder_fails_before_training(workdir, dataset, capsys):
    from musicgen_finetune import UserError, launch

    with pytest.raises(UserError, match=f"{workdir / 'no-such-model'} is not a folder"):
        launch.run(str(workdir / "no-such-model"), DATASET, preset="finetune/cpu_tiny")
    assert "Running: dora" not in capsys.readouterr().out


def test_missing_dataset_names_the_manifest(workdir, tiny_model, capsys):
    from musicgen_finetune import UserError, launch

    with pytest.raises(UserError) as refusal:
        launch.run(str(tiny_model), "not-prepared", preset="finetune/cpu_tiny")
    assert "not-prepared/train/data.jsonl does not exist" in str(refusal.value)
    assert "make manifests" in str(refusal.value) and "Running: dora" not in capsys.readouterr().out


def test_gradient_accumulation_matches_the_full_batch(workdir, tiny_model, beats):
    """One epoch in 1 micro-batch or in 2 ends at the same weights. All randomness of the step is switched off,
    and every caption is the same: AudioCraft's cross-attention also attends to T5 padding, so captions of other
    lengths would legitimately give micro-batches other outputs than the full batch."""
    import json
    import shutil

    from musicgen_finetune.data.manifests import ManifestOptions, build_manifests

    same_caption = workdir / "same-caption"
    shutil.copytree(beats, same_caption, dirs_exist_ok=True)
    entries = [
        {"audio": e["audio"], "text": "hip hop 808 beat"} for e in json.loads((beats / "metadata.json").read_text())
    ]
    (same_caption / "metadata.json").write_text(json.dumps(entries))
    build_manifests(same_caption, "same-caption", ManifestOptions(segment=1.0, valid=0.25, describe=False))
    deterministic = (
        "optim.epochs=2 generate.every=1000 classifier_free_guidance.training_dropout=0 "
        "conditioners.description.t5.word_dropout=0 dataset.train.merge_text_p=0 "
        "dataset.train.drop_desc_p=0 dataset.train.drop_other_p=0 "
    )
    histories = []
    for steps in (1, 2):
        result = run_tool(
            [
                TRAIN,
                "--model",
                str(tiny_model),
                "--name",
                "same-caption",
                "--preset",
                "finetune/cpu_tiny",
                "--args",
                deterministic + f"optim.grad_accum_steps={steps}",
            ],
            workdir,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"in {steps} micro-batch(es)" in result.stderr + result.stdout
        histories.append(json.loads((xp_folder(result) / "history.json").read_text()))
    # Same gradient norm at every update, and the same losses in epoch 2, which start from the updated weights.
    # (Weights themselves are no fair comparison: Adam turns float noise in near-zero gradients into +-lr steps.)
    for full, accumulated in zip(*histories, strict=True):
        for stage, metric in (("train", "ce"), ("train", "grad_norm"), ("valid", "ce")):
            assert accumulated[stage][metric] == pytest.approx(full[stage][metric], rel=1e-4), (stage, metric)
    assert histories[0][1]["train"]["ce"] < histories[0][0]["train"]["ce"]


def test_snapshot_of_another_architecture_is_refused_by_name(workdir, tiny_model, dataset, tmp_path):
    import shutil

    model = tmp_path / "odd-model"
    shutil.copytree(tiny_model, model)
    package = torch.load(model / "state_dict.bin", weights_only=True)
    package["best_state"]["transformer.layers.9.linear1.weight"] = torch.zeros(4, 4, dtype=torch.float16)
    torch.save(package, model / "state_dict.bin")
    result = train(workdir, model)
    assert result.returncode != 0
    assert (
        f"{model / 'state_dict.bin'} does not fit the LM this config builds: 1 unexpected "
        "(transformer.layers.9.linear1.weight)" in result.stderr
    )


def test_padding_masked_from_the_loss_is_not_learned(workdir, tiny_model, dataset):
    """1 s clips trained as 1.5 s segments: with tokens.padding_with_special_token (the dataset's plan for short
    clips) the loss leaves the padding out, so it is close to the loss on 1 s segments, which have none; without the
    mask the padding counts. All at lr 0 (the same weights): only what the loss counts differs."""
    still = "optim.lr=0 schedule.lr_scheduler=null optim.epochs=1 "

    def valid_ce(args: str) -> float:
        result = train(workdir, tiny_model, args=still + args)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((xp_folder(result) / "history.json").read_text())[0]["valid"]["ce"]

    no_padding = valid_ce("dataset.segment_duration=1")
    masked = valid_ce("dataset.segment_duration=1.5 tokens.padding_with_special_token=true")
    unmasked = valid_ce("dataset.segment_duration=1.5 tokens.padding_with_special_token=false")
    assert masked != unmasked
    assert abs(masked - no_padding) < 0.5 * abs(unmasked - no_padding)


def test_lora_trains_adapters_only_and_checkpoints_them(lora_run, first_run, lora_model):
    from musicgen_finetune import lora

    log = lora_run.stderr + lora_run.stdout
    assert "LoRA rank 4, alpha 8, dropout 0.1 on 16 projections" in log
    trained, total = map(
        lambda s: int(s.replace(",", "")), re.search(r"Training ([\d,]+) of ([\d,]+) LM parameters", log).groups()
    )
    assert trained < total / 10
    checkpoint = torch.load(xp_folder(lora_run) / "checkpoint.th", weights_only=True)
    assert checkpoint["model"] and all(lora.is_adapter_key(k) for k in checkpoint["model"])
    best = resolve_best_state(xp_folder(lora_run), checkpoint)["model"]
    assert best and all(lora.is_adapter_key(k) and v.dtype == torch.float32 for k, v in best.items())
    snapshot = torch.load(lora_model / "state_dict.bin", weights_only=True)["best_state"]
    assert checkpoint["lora"]["hash"] == lora.base_model_hash(snapshot)
    assert checkpoint["lora"]["path"] == str(lora_model / "state_dict.bin")
    full_size = (xp_folder(first_run) / "checkpoint.th").stat().st_size
    assert (xp_folder(lora_run) / "checkpoint.th").stat().st_size < full_size / 5
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in checkpoint["model"].items() if "lora_B" in k)


def test_lora_experiment_restores_base_and_adapters(lora_run, lora_model):
    """What a resume does: the base from the snapshot, the adapters from the checkpoint."""
    from musicgen_finetune import lora
    from musicgen_finetune.train import get_solver_from_sig

    folder = xp_folder(lora_run)
    solver = get_solver_from_sig(folder.name)
    checkpoint = torch.load(folder / "checkpoint.th", weights_only=True)
    state = solver.model.state_dict()
    for key, value in resolve_best_state(folder, checkpoint)["model"].items():
        assert torch.equal(state[key], value), key
    snapshot = torch.load(lora_model / "state_dict.bin", weights_only=True)["best_state"]
    for key, value in snapshot.items():
        assert torch.equal(state[key], value.float()), key
    assert lora.adapted_names(solver.model)


def test_lora_resume_refuses_a_changed_base(lora_run, workdir, lora_model):
    again = train(workdir, lora_model, preset="finetune/cpu_tiny_lora")
    assert again.returncode == 0 and "matches the checkpoint" in again.stderr + again.stdout
    original = (lora_model / "state_dict.bin").read_bytes()
    package = torch.load(lora_model / "state_dict.bin", weights_only=True)
    key = next(iter(package["best_state"]))
    package["best_state"][key] = package["best_state"][key] + 1
    torch.save(package, lora_model / "state_dict.bin")
    try:
        changed = train(workdir, lora_model, preset="finetune/cpu_tiny_lora")
    finally:
        (lora_model / "state_dict.bin").write_bytes(original)  # other tests export this run
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    refusal = one_error_line(changed.stderr)
    assert "The adapters in this checkpoint were trained on" in refusal and "FRESH=1" in refusal
    assert "resumes" not in changed.stderr  # a refused run is not an interrupted one


@pytest.mark.long  # three runs; the same refusal of a changed base for LoRA runs: above
def test_full_resume_refuses_a_changed_base_until_fresh(workdir, tiny_model, dataset, tmp_path):
    """A model folder replaced under an experiment is not silently ignored on resume; FRESH=1 starts over from it."""
    import shutil

    from musicgen_finetune.lora import base_model_hash

    model = tmp_path / "replaced-model"
    shutil.copytree(tiny_model, model)
    first = train(workdir, model, args="optim.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    package = torch.load(model / "state_dict.bin", weights_only=True)
    key = next(iter(package["best_state"]))
    package["best_state"][key] = package["best_state"][key] + 1
    torch.save(package, model / "state_dict.bin")
    refused = train(workdir, model, args="optim.epochs=1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    refusal = one_error_line(refused.stderr)
    assert f"This run was trained on {model / 'state_dict.bin'}" in refusal and "FRESH=1" in refusal
    fresh = run_tool(
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
            "--fresh",
        ],
        workdir,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert xp_folder(fresh) == xp_folder(first) and "dora -P musicgen_finetune run --clear" in fresh.stdout
    assert "Loading existing checkpoint" not in fresh.stderr
    checkpoint = torch.load(xp_folder(fresh) / "checkpoint.th", weights_only=True)
    assert checkpoint["base_model"]["hash"] == base_model_hash(package["best_state"])


@pytest.mark.long  # EMA, an option off in every preset
def test_lora_with_ema_averages_the_adapters_only(workdir, lora_model, dataset):
    from musicgen_finetune import lora

    result = train(
        workdir,
        lora_model,
        preset="finetune/cpu_tiny_lora",
        args="optim.ema.use=true optim.ema.updates=1 optim.ema.device=cpu optim.epochs=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(xp_folder(result) / "checkpoint.th", weights_only=True)
    averaged = checkpoint["ema"]["state"]["lora_adapters"]
    assert averaged and all(lora.is_adapter_key(k) for k in averaged)
    assert averaged.keys() == checkpoint["model"].keys()


@pytest.mark.long  # the kill-and-resume tests (test_resume.py) cover the same restore; this is the graceful stop
@pytest.mark.parametrize("preset", ["finetune/cpu_tiny", "finetune/cpu_tiny_lora"])
def test_interrupted_run_resumes_where_it_stopped(workdir, lora_model, dataset, preset):
    """A run stopped after epoch 1 continues with epoch 2 from its checkpoint (weights, optimizer, schedule), in the
    same experiment folder."""
    args = "optim.epochs=2 generate.every=1000 dataset.train.shuffle_seed=11"
    first = train(workdir, lora_model, preset=preset, args=args + " stop_after_epoch=1")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = xp_folder(first)
    assert len(json.loads((folder / "history.json").read_text())) == 1
    second = train(workdir, lora_model, preset=preset, args=args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert xp_folder(second) == folder  # stop_after_epoch is not part of the signature
    log = second.stderr + second.stdout
    assert "Loading existing checkpoint" in log and "Train | Epoch 2" in log and "Train | Epoch 1 " not in log
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 2 and all(math.isfinite(e["valid"]["ce"]) for e in history)
    checkpoint = torch.load(folder / "checkpoint.th", weights_only=True)
    assert checkpoint["lr_scheduler"]["_step_count"] > 1 and checkpoint["optimizer"]["state"]


def test_completed_run_is_marked_done_with_its_best_epoch(first_run):
    folder = xp_folder(first_run)
    history = json.loads((folder / "history.json").read_text())
    done = json.loads((folder / "done.json").read_text())
    valid = [epoch["valid"]["ce"] for epoch in history]
    assert done == {
        "reason": "completed",
        "epochs": 3,
        "best_epoch": valid.index(min(valid)) + 1,
        "metric": "ce",
        "forgetting_budget": None,
        "best_reason": "lowest valid ce",
    }


def test_early_stop_ends_when_valid_loss_stops_improving(workdir, tiny_model, dataset):
    # lr 0: the valid loss is the same every epoch, so epoch 1 stays the best and patience 1 ends epoch 2
    result = train(workdir, tiny_model, "optim.lr=0 optim.epochs=5 early_stop.patience=1 schedule.lr_scheduler=null")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = xp_folder(result)
    assert len(json.loads((folder / "history.json").read_text())) == 2
    assert json.loads((folder / "done.json").read_text())["reason"] == "early_stop"
    assert json.loads((folder / "done.json").read_text())["best_epoch"] == 1
    assert "Early stop: valid ce has not improved for 1 epochs since its best, epoch 1" in result.stderr
