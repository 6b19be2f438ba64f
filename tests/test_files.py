"""Outputs are replaced only when complete (files.py): a failure at any point leaves the previous output whole."""

import os
import stat

import pytest

from musicgen_finetune.files import replaced_when_complete, write_atomically, write_text_atomically


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def ordinary(kind: str) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if kind == "folder" else 0o666) & ~mask


def test_a_failure_inside_keeps_the_previous_output(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "index.html").write_text("the previous report")
    with pytest.raises(RuntimeError, match="midway"):
        with replaced_when_complete(out) as staging:
            (staging / "index.html").write_text("half of a new one")
            raise RuntimeError("midway")
    assert (out / "index.html").read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no .partial, no .previous left


def test_a_complete_output_replaces_the_previous_one_with_ordinary_modes(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with replaced_when_complete(out) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.txt").write_text("new")
        os.chmod(staging / "sub" / "new.txt", 0o600)  # as temporary files are created
    assert sorted(p.name for p in out.rglob("*")) == ["new.txt", "sub"]
    assert mode(out / "sub" / "new.txt") == ordinary("file") and mode(out / "sub") == ordinary("folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_an_interruption_between_the_renames_is_recovered(tmp_path):
    """Killed after the old folder was moved aside and before the new one took its place: the next run puts the old
    one back first, so a failure then still leaves the old output."""
    out, previous = tmp_path / "report", tmp_path / "report.previous"
    previous.mkdir()
    (previous / "index.html").write_text("the previous report")
    with pytest.raises(RuntimeError):
        with replaced_when_complete(out):
            assert (out / "index.html").read_text() == "the previous report"
            raise RuntimeError("failed again")
    assert (out / "index.html").read_text() == "the previous report" and not previous.exists()


def test_write_atomically_keeps_the_old_file_on_failure_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text("[1]")

    def fail(tmp):
        tmp.write_text("[1, 2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_text() == "[1]" and [p.name for p in tmp_path.iterdir()] == ["choices.json"]
    write_text_atomically(path, "[1, 2]")
    assert path.read_text() == "[1, 2]" and mode(path) == ordinary("file")
