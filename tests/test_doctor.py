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
    bytes_per_parameter = doctor.disk_needed(1) * 2**30
    assert doctor.check_disk(tmp_path, parameters=free // bytes_per_parameter // 2, model="small").ok
    too_big = doctor.check_disk(tmp_path / "not" / "yet", parameters=free // bytes_per_parameter * 2, model="big")
    assert not too_big.ok and f"at {tmp_path}" in too_big.detail and "OUTPUT=<folder>" in too_big.detail
    # musicgen-small: a lean checkpoint of 5,044.8 MB (make bench --full-size-only), twice during its rename, the best
    # state in fp16 (840.8 MB) and an fp32 export (1.68 GB)
    expected = 2 * 5044.8e6 + 840.8e6 + 1.68e9
    assert abs(doctor.disk_needed(doctor.MUSICGEN_SMALL_PARAMETERS) * 2**30 - expected) < 0.05 * expected
