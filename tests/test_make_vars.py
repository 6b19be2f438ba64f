"""Every variable on `make`'s command line is one the goal reads (tools/check_make_vars.py): a typo stops `make`
before anything runs, naming the closest variable, and a training setting is shown as the ARGS override it is."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import check_make_vars  # noqa: E402

MAKEFILE = (REPO / "Makefile").read_text()


def make_dry_run(*args):
    """`make -n` as a user types it: not as a make inside `make test`, whose variables it would inherit."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_a_training_setting_given_as_a_variable_stops_make_naming_the_override():
    result = make_dry_run("train", "MODEL=m", "NAME=n", "EPOCH=2")
    assert result.returncode != 0 and result.stdout == ""  # nothing would have run
    assert "EPOCH= is not a variable of make train: did you mean ARGS='optim.epochs=2'" in result.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (
            ("manifests", "DATA=d", "NAME=n", "SEGMNT=10"),
            "SEGMNT= is not a variable of make manifests: did you mean SEGMENT=?",
        ),
        (
            ("generate", "MODEL=m", "PROMPT=a beat"),
            "PROMPT= is not a variable of make generate: did you mean PROMPTS=?",
        ),
        (("train", "MODEL=m", "NAME=n", "SEGMENT=10"), "SEGMENT= is not a variable of make train"),
    ],
)
def test_an_unknown_variable_names_the_closest_known_one(args, named):
    result = make_dry_run(*args)
    assert result.returncode != 0 and named in result.stderr


def test_known_and_environment_variables_pass():
    for args in (
        ("train", "MODEL=m", "NAME=n", "LORA=1", "ARGS=optim.epochs=2", "OUTPUT=o", "CUDA_VISIBLE_DEVICES=1"),
        ("manifests", "DATA=d", "NAME=n", "SEGMENT=10", "FORCE=1"),
        ("test-all", "PYTEST_ARGS=-x", "TEST_WORKERS=1"),  # read by its prerequisites' recipes, not its own
        ("manifests", "DATA=d", "NAME=n", "PYTHON=python3"),  # read by tools/setup.sh, which `setup` runs first
    ):
        result = make_dry_run(*args)
        assert result.returncode == 0, result.stderr


def help_variables():
    """Each target's variables as its `make help` line lists them (before the description)."""
    for line in MAKEFILE.splitlines():
        match = re.match(r"^([a-z][a-z0-9-]*):.*## (.*)", line)
        if match:
            usage = match.group(2).split(": ", 1)[0]
            yield match.group(1), sorted(set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", usage)))


def test_every_variable_a_target_documents_is_one_it_reads():
    pairs = [(goal, name) for goal, names in help_variables() for name in names]
    assert len(pairs) > 40
    wrong = [(g, n, check_make_vars.problem([g], [n], MAKEFILE)) for g, n in pairs]
    assert [w for w in wrong if w[2]] == []


def test_every_make_command_in_the_docs_passes():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "egs").rglob("*.md"))]
    command = re.compile(r"make ([a-z][a-z-]*)((?: [A-Z][A-Z0-9_]*=(?:'[^']*'|\"[^\"]*\"|[^\s`]+))+)")
    found = 0
    for doc in docs:
        for goal, assignments in command.findall(doc.read_text()):
            names = re.findall(r" ([A-Z][A-Z0-9_]*)=", assignments)
            found += 1
            assert check_make_vars.problem([goal], names, MAKEFILE) is None, (doc.name, goal, assignments)
    assert found > 20


def test_args_written_as_flags_get_the_key_value_form():
    from musicgen_finetune.config import OverrideError, overrides_from_args

    assert overrides_from_args("optim.epochs=3 'generate.lm.prompts=[a b]'") == [
        "optim.epochs=3",
        "generate.lm.prompts=[a b]",
    ]
    with pytest.raises(OverrideError, match=r"write each override as key=value, without dashes: ARGS='optim.epochs=3'"):
        overrides_from_args("lora.rank=4 --optim.epochs=3")


@pytest.mark.parametrize("goal", ["train", "plan"])
def test_make_hands_args_that_start_with_a_dash_to_the_tool_as_a_value(goal):
    """`--args "--x"` would be read by argparse as a flag of its own (a usage dump); `--args="--x"` is a value."""
    result = make_dry_run(goal, "MODEL=m", "NAME=n", "ARGS=--optim.epochs=3")
    assert result.returncode == 0 and '--args="--optim.epochs=3"' in result.stdout
