"""`make doctor` says what is fine and what to fix."""

from musicgen_finetune import doctor, environment

environment.prepare()


def test_doctor_passes_on_a_good_setup(tiny_model, capsys):
    assert doctor.run(str(tiny_model)) == 0
    out = capsys.readouterr().out
    assert f"ok   t5                 {tiny_model / 't5'}" in out and "All good." in out
    # what optim.grad_accum_steps=auto picks on this machine's GPU (without one: the presets' 24 GB card)
    assert "ok   fit full           batch 8 per GPU in 1 micro-batch(es)" in out and "ok   fit LoRA" in out


def test_doctor_names_what_to_fix(tmp_path, capsys):
    assert doctor.run(str(tmp_path / "missing")) == 1
    out = capsys.readouterr().out
    assert f"FIX  model              MODEL={tmp_path / 'missing'}" in out


def test_doctor_finds_no_ffmpeg(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    check = doctor.check_ffmpeg()
    assert not check.ok and "make setup" in check.detail


def test_disk_check_is_sized_to_the_model(tmp_path):
    """The room asked for follows the model's size: a tiny model passes where a model too big for the disk fails."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    bytes_per_parameter = 2 * doctor.CHECKPOINT_BYTES_PER_PARAMETER + doctor.EXPORT_BYTES_PER_PARAMETER
    assert doctor.check_disk(tmp_path, parameters=free // bytes_per_parameter // 2, model="small").ok
    too_big = doctor.check_disk(tmp_path / "not" / "yet", parameters=free // bytes_per_parameter * 2, model="big")
    assert not too_big.ok and f"at {tmp_path}" in too_big.detail and "OUTPUT=<folder>" in too_big.detail
    # musicgen-small: a checkpoint of ~8.8 GB (measured upstream), twice, and an fp32 export
    assert 2 * 8.8e9 < doctor.disk_needed(doctor.MUSICGEN_SMALL_PARAMETERS) * 2**30 < 2 * 8.8e9 + 2.0e9
