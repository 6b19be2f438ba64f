"""config.py's checks of what a user writes, in this process and without composing a config (make mutate runs these
per mutant): value bounds and their wording, override values written for Hydra (Hydra's own parser is the oracle),
ARGS split into overrides, unknown keys."""

import math
import re

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from musicgen_finetune.config import (
    Allowed,
    OverrideError,
    check_override_keys,
    check_values,
    dotted_keys,
    hydra_value,
    is_config_group,
    leaves,
    overrides_from_args,
    parse_overrides,
)

# (what is allowed, values it takes, values it refuses), the edges worked out by hand from each rule's words
BOUNDS = [
    (Allowed(int, 1), [1, 2, 10**9, 3.0], [0, -1, 2.5, True, None, "3", math.inf, math.nan]),
    (Allowed(float, 0), [0, 0.0, 1e-9, 7], [-1e-9, -1, math.inf, math.nan, False, None, "1e-4"]),
    (Allowed(float, 0, low_open=True), [1e-9, 1, 2.5], [0, 0.0, -1]),
    (Allowed(float, 0, 1), [0, 0.5, 0.999], [1, 1.0, 1.5, -0.1]),
    (Allowed(float, 0, 1, high_closed=True), [0, 0.5, 1, 1.0], [1.0001, -0.1]),
    (Allowed(float, 0, 1, low_open=True, high_closed=True), [0.001, 1], [0, 1.01]),
    (Allowed(int, 1, nullable=True), [None, 1, 4], [0, "null", "auto"]),
    (Allowed(int, 1, words=("auto",)), ["auto", 1, 2], ["Auto", "max", None, 0]),
    (Allowed(float, -2, -1), [-2, -1.5], [-1, -2.5, 0]),
]


@pytest.mark.parametrize("allowed, takes, refuses", BOUNDS)
def test_allowed_takes_and_refuses_exactly_its_range(allowed, takes, refuses):
    for value in takes:
        assert allowed.problem("a.key", value) is None, value
    for value in refuses:
        assert allowed.problem("a.key", value) == f"a.key={value}: {allowed.describe()}", value


@pytest.mark.parametrize(
    "allowed, text",
    [
        (Allowed(int), "must be a whole number"),
        (Allowed(float), "must be a number"),
        (Allowed(int, 1), "must be a whole number >= 1"),
        (Allowed(float, 0, low_open=True), "must be a number > 0"),
        (Allowed(float, 0, 1), "must be a number >= 0 and < 1"),
        (Allowed(float, 0.5, 2, low_open=True, high_closed=True), "must be a number > 0.5 and <= 2"),
        (Allowed(float, high=1e-4), "must be a number < 0.0001"),
        (Allowed(int, 1, nullable=True, what="null: never"), "must be a whole number >= 1 or null (null: never)"),
        (Allowed(int, 1, words=("auto", "max")), "must be a whole number >= 1 or auto or max"),
        (Allowed(int, 0, nullable=True, words=("auto",)), "must be a whole number >= 0 or null or auto"),
    ],
)
def test_allowed_says_what_it_allows(allowed, text):
    assert allowed.describe() == text


def test_an_unbounded_number_takes_any_finite_number():
    anything = Allowed(float)
    assert [anything.problem("k", v) for v in (-1e300, 0, 1e300)] == [None, None, None]
    assert anything.problem("k", math.inf) == "k=inf: must be a number"


VALUES = [
    None,
    True,
    False,
    0,
    -3,
    2.5,
    1e-4,
    "plain",
    "with-dash_under./slash",
    "with space",
    "it's",
    "back\\slash",
    "ends in a backslash\\",
    "quote after backslashes\\\\'s",
    "null",
    "True",
    "2024",
    "1e-4",
    "inf",
    "/abs/path-1.0/x",
    "a=b",
    "",
    "[not a list]",
    [1, 2.5, "x"],
    [],
    [[1, 2], ["a b"]],
    ["null", None],
]


# ids of letters, digits and _ only: mutmut selects tests by node id, which quotes and backslashes would break
@pytest.mark.parametrize("value", VALUES, ids=lambda value: re.sub(r"\W+", "_", repr(value)).strip("_") or "empty")
def test_hydra_reads_back_every_value_written_as_an_override(value):
    """Hydra's own parser is the oracle: `key=<hydra_value(v)>` must parse back to v, type included."""
    [override] = OverridesParser.create().parse_overrides([f"key={hydra_value(value)}"])
    parsed = override.value()
    assert parsed == value and type(parsed) is type(value)


def test_hydra_values_are_written_plainly_where_they_can_be():
    assert [hydra_value(v) for v in (None, True, False, 3, 0.5)] == ["null", "true", "false", "3", "0.5"]
    assert hydra_value("manifests/my808/train") == "manifests/my808/train"
    assert hydra_value(["a", 1]) == "[a,1]"
    assert hydra_value("two words") == "'two words'"
    assert hydra_value("") == "''"
    assert hydra_value("2024") == "'2024'" and hydra_value("null") == "'null'"  # else read as a number and None


def test_leaves_are_every_nested_value_by_dotted_key():
    nested = {"a": {"b": 1, "c": {"d": [2, 3]}}, "e": None, "f": {}}
    assert list(leaves(nested)) == [("a.b", 1), ("a.c.d", [2, 3]), ("e", None)]
    assert list(leaves(5)) == [("", 5)]
    assert list(leaves({"x": 1}, "top")) == [("top.x", 1)]


def test_dotted_keys_are_every_key_sections_included():
    cfg = OmegaConf.create({"optim": {"lr": 1, "ema": {"decay": 0.9}}, "device": "cpu", "lr2": "${optim.lr}"})
    assert dotted_keys(cfg) == ["optim", "optim.lr", "optim.ema", "optim.ema.decay", "device", "lr2"]
    # keys as written: an interpolation is not resolved (dora's and AudioCraft's trees hold some that only resolve
    # in a run, and one naming a section is one key)
    cfg = OmegaConf.create({"a": {"b": 1}, "alias": "${a}", "later": "${not.yet.there}"})
    assert dotted_keys(cfg) == ["a", "a.b", "alias", "later"]


def test_a_config_group_is_a_folder_in_any_tree(tmp_path):
    first, second = tmp_path / "ours", tmp_path / "upstream"
    (first / "solver" / "finetune").mkdir(parents=True)
    (second / "model" / "lm").mkdir(parents=True)
    (second / "optim.yaml").write_text("")
    assert is_config_group("solver", [first, second]) and is_config_group("solver/finetune", [first, second])
    assert is_config_group("model/lm", [first, second])
    assert not is_config_group("optim", [first, second]) and not is_config_group("solver", [second])
    assert not is_config_group("solver", [])


def test_args_split_like_a_shell_and_flags_are_refused_with_the_way_to_write_them():
    assert overrides_from_args("optim.epochs=3 'dataset.caption=two words' lora.targets=[a,b]") == [
        "optim.epochs=3",
        "dataset.caption=two words",
        "lora.targets=[a,b]",
    ]
    assert overrides_from_args("") == []
    for flag, fix in [("--optim.epochs=3", "optim.epochs=3"), ("-optim.lr=1", "optim.lr=1"), ("--X.y=1", "X.y=1")]:
        with pytest.raises(OverrideError) as refused:
            overrides_from_args(f"optim.lr=1e-4 {flag}")
        assert str(refused.value) == (
            f"ARGS: {flag!r} is written as a flag; write each override as key=value, without dashes: ARGS='{fix}'."
        )
    assert overrides_from_args("optim.lr=-1") == ["optim.lr=-1"]  # a negative value is not a flag


def test_an_override_that_does_not_parse_is_named():
    from hydra.errors import OverrideParseException

    assert [o.key_or_group for o in parse_overrides(["a.b=1", "+c=2", "solver=x"])] == ["a.b", "c", "solver"]
    with pytest.raises(OverrideParseException) as hydra_says:
        OverridesParser.create().parse_overrides(["a.b=[1,"])
    first_line = str(hydra_says.value).strip().splitlines()[0]
    with pytest.raises(OverrideError) as refused:
        parse_overrides(["a.b=1", "a.b=[1,"])
    assert str(refused.value) == (
        f"ARGS: 'a.b=[1,' is not a Hydra override ({first_line}); write key=value, e.g. optim.epochs=20 or "
        "lora.targets=[linear1,linear2]."
    )


CFG = {"optim": {"epochs": 3, "lr": 1e-4, "ema": {"epochs": 1}}, "lora": {"rank": 8}, "dataset": {"batch_size": 4}}


def test_every_override_must_name_a_key_or_a_group(tmp_path):
    cfg = OmegaConf.create(CFG)
    (tmp_path / "solver").mkdir()
    check_override_keys(["optim.epochs=4", "lora.rank=4", "optim.ema=null", "solver=x", "+new.key=1"], cfg, [tmp_path])
    with pytest.raises(OverrideError) as refused:
        check_override_keys(["optim.epochs=4", "optim.epoch=4"], cfg, [tmp_path])
    assert str(refused.value) == "optim.epoch: no such key; did you mean optim.epochs?"
    with pytest.raises(OverrideError) as refused:
        check_override_keys(["epochs=4"], cfg, [tmp_path])
    assert str(refused.value) == "epochs: no such key; did you mean optim.epochs or optim.ema.epochs?"
    with pytest.raises(OverrideError) as refused:
        check_override_keys(["zzzzzz=1"], cfg, [tmp_path])
    assert str(refused.value) == (
        "zzzzzz: no such key; the keys are those of config/solver/finetune/musicgen_small.yaml and AudioCraft's "
        "config tree"
    )
    for first in ("solver=x", "+new.key=1"):  # a group or an added key does not end the check of the others
        with pytest.raises(OverrideError, match="^optim.epoch: no such key"):
            check_override_keys([first, "optim.epoch=4"], cfg, [tmp_path])
    with pytest.raises(OverrideError, match="^solver: no such key"):
        check_override_keys(["solver=x"], cfg, [])  # not a group where there is no such folder


def test_value_problems_are_each_named_in_one_line():
    cfg = OmegaConf.create(
        {"optim": {"epochs": 0, "lr": -1, "updates_per_epoch": None}, "lora": {"dropout": 1}, "dataset": {}}
    )
    with pytest.raises(OverrideError) as refused:
        check_values(cfg)
    assert str(refused.value) == (
        "optim.epochs=0: must be a whole number >= 1 (passes over the training set); "
        "optim.lr=-1: must be a number >= 0 (the learning rate, e.g. 1e-4 for full fine-tuning, 3e-4 for LoRA); "
        "lora.dropout=1: must be a number >= 0 and < 1 (0 turns it off)."
    )
    check_values(OmegaConf.create({"optim": {"epochs": 2, "grad_accum_steps": "auto"}}))  # absent keys: not checked
    with pytest.raises(OverrideError, match=r"^optim.epochs=None: must be a whole number >= 1"):
        check_values(OmegaConf.create({"optim": {"epochs": None}}))  # present and null where null is not allowed
