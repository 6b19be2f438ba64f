"""`make doctor` says what is fine and what to fix."""
from musicgen_finetune import doctor, environment

environment.prepare()


def test_doctor_passes_on_a_good_setup(tiny_model, capsys):
    assert doctor.run(str(tiny_model)) == 0
    out = capsys.readouterr().out
    assert f"ok   t5                 {tiny_model / 't5'}" in out and "All good." in out


def test_doctor_names_what_to_fix(tmp_path, capsys):
    assert doctor.run(str(tmp_path / "missing")) == 1
    out = capsys.readouterr().out
    assert f"FIX  model              MODEL={tmp_path / 'missing'}" in out


def test_doctor_finds_no_ffmpeg(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    check = doctor.check_ffmpeg()
    assert not check.ok and "make setup" in check.detail
