"""The harness's Hydra config (config/ over AudioCraft's tree) outside of dora, and writing values as overrides.

compose(overrides)     the config `dora -P musicgen_finetune run <overrides>` would run with
hydra_value(value)     a Python value written as a command-line override value
leaves(nested)         (dotted key, value) for every leaf of nested dicts
check_override_keys    every `key=value` a user gives names a key: one line with the closest ones if not
check_values           the values of the keys people change most: type and range, one line naming each
"""

import dataclasses
import difflib
import math
import re
import shlex
import typing as tp
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from .errors import UserError
from .paths import CONFIG_DIR

PRIMARY_CONFIG = "musicgen_finetune"


def compose(overrides: tp.Sequence[str] = ()) -> DictConfig:
    """The config `dora -P musicgen_finetune run <overrides>` would run with."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.1", job_name=PRIMARY_CONFIG):
        return hydra_compose(PRIMARY_CONFIG, overrides=list(overrides))


def leaves(value: tp.Any, prefix: str = "") -> tp.Iterator[tp.Tuple[str, tp.Any]]:
    """(dotted key, value) for every leaf of nested dicts."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaves(child, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def hydra_value(value: tp.Any) -> str:
    """A Python value written as a Hydra command-line override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if text and all(c.isalnum() or c in "-_./" for c in text) and reads_back_as(text) == text:
        return text  # plain, unless Hydra would read it as another type: `null`, `true`, `2024`, `1e-4`, `inf`
    # Hydra's quoted strings (hydra/core/override_parser/overrides_visitor.py, visitQuotedValue): a backslash is
    # literal unless a run of them precedes a quote, where each is written twice; the quote itself is escaped.
    escaped = re.sub(r"(\\*)'", lambda run: run.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda run: run.group(1) * 2, escaped)
    return f"'{escaped}'"


def reads_back_as(text: str) -> tp.Any:
    """The value Hydra reads from the override value `text`."""
    [override] = OverridesParser.create().parse_overrides([f"key={text}"])
    return override.value()


# -- checking what a user overrides, before anything is created -------------------------------------------------


class OverrideError(UserError, ValueError):
    """An override names no key, or gives a value of the wrong type or out of range; the message names the key,
    the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Allowed:
    """What a key accepts: a whole number or a number, within bounds, maybe null; `what` says what it means."""

    kind: type  # int or float
    low: tp.Optional[float] = None  # inclusive unless low_open
    high: tp.Optional[float] = None  # exclusive unless high_closed
    low_open: bool = False
    high_closed: bool = False
    nullable: bool = False
    what: str = ""
    words: tp.Tuple[str, ...] = ()  # values allowed besides numbers, e.g. "auto"

    def problem(self, key: str, value: tp.Any) -> tp.Optional[str]:
        """None when `value` is allowed, else why not, naming the key and the value."""
        if (value is None and self.nullable) or (isinstance(value, str) and value in self.words):
            return None
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (self.kind is int and not float(value).is_integer()) or not math.isfinite(value):
            return f"{key}={value}: {self.describe()}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value > self.high if self.high_closed else value >= self.high)
        return f"{key}={value}: {self.describe()}" if too_low or too_high else None

    def describe(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<=' if self.high_closed else '<'} {self.high:g}")
        text = ("a whole number" if self.kind is int else "a number") + (" " + " and ".join(bounds) if bounds else "")
        text += " or null" if self.nullable else ""
        text += "".join(f" or {word}" for word in self.words)
        return f"must be {text}" + (f" ({self.what})" if self.what else "")


# What the keys users override most accept; the defaults themselves live in the YAML presets only.
ALLOWED = {
    "optim.epochs": Allowed(int, 1, what="passes over the training set"),
    "optim.lr": Allowed(float, 0, what="the learning rate, e.g. 1e-4 for full fine-tuning, 3e-4 for LoRA"),
    "optim.grad_accum_steps": Allowed(
        int, 1, words=("auto",), what="micro-batches per update; auto: the fewest that fit the GPU (make plan)"
    ),
    "optim.max_norm": Allowed(float, 0, what="gradient clipping; 0 turns it off"),
    "optim.updates_per_epoch": Allowed(int, 1, nullable=True, what="null: from the dataset's size"),
    "dataset.batch_size": Allowed(int, 1, what="segments per update, over all GPUs"),
    "dataset.segment_duration": Allowed(float, 0, low_open=True, what="seconds of audio per training segment"),
    "dataset.num_workers": Allowed(int, 0, what="data-loading processes; 0 loads in the training process"),
    "lora.rank": Allowed(int, 1, what="the adapters' inner size, e.g. 8, 12 or 16"),
    "lora.alpha": Allowed(float, 0, low_open=True, what="the update is scaled by alpha / rank"),
    "lora.dropout": Allowed(float, 0, 1, what="0 turns it off"),
    "early_stop.patience": Allowed(int, 1, nullable=True, what="epochs without improvement; null: never stop early"),
    "early_stop.forgetting_budget": Allowed(
        float, 0, nullable=True, what="relative rise of the prior set's cross-entropy allowed, e.g. 0.1"
    ),
    "prior.ratio": Allowed(float, 0, low_open=True, what="prior sequences per real segment in each update"),
    "prior.weight": Allowed(float, 0, what="the prior term's weight in the loss"),
    "prior.teacher_top_k": Allowed(int, 1, what="the base's likeliest codes stored per position"),
    "replay.share": Allowed(float, 0, 1, low_open=True, what="the share of each epoch's draws from replay.dataset"),
    "generate.every": Allowed(int, 1, what="epochs between samples"),
    "generate.lm.gen_duration": Allowed(float, 0, low_open=True, what="seconds per sample"),
    "generate.lm.top_k": Allowed(int, 0, what="0 turns top-k off"),
    "schedule.cosine.warmup": Allowed(int, 0, what="optimizer updates"),
    "stop_after_epoch": Allowed(int, 1, nullable=True, what="null: run every epoch"),
}


def parse_overrides(overrides: tp.Sequence[str]) -> list:
    """Hydra's parse of `key=value` overrides, or OverrideError naming the one that does not parse."""
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as err:
            first = str(err).strip().splitlines()[0]
            raise OverrideError(
                f"ARGS: {text!r} is not a Hydra override ({first}); write key=value, e.g. "
                "optim.epochs=20 or lora.targets=[linear1,linear2]."
            ) from None
    return parsed


def is_config_group(key: str, search_path: tp.Sequence[Path]) -> bool:
    """`solver`, `dset`, `model/lm/model_scale`, ...: a folder of options in one of the config trees."""
    return any((root / key).is_dir() for root in search_path)


def dotted_keys(cfg: DictConfig) -> tp.List[str]:
    """Every key of `cfg`, nested ones dotted, sections included."""
    keys = []

    def walk(node: tp.Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                path = f"{prefix}.{key}" if prefix else str(key)
                keys.append(path)
                walk(child, path)

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return keys


def closest_keys(key: str, known: tp.Sequence[str], count: int = 3) -> tp.List[str]:
    """The known keys most like `key`: the closest spellings of the whole key (within a hair of the closest), then
    keys of the same last name (`epochs` -> `optim.epochs`)."""
    scores = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in known}
    best = max(scores.values(), default=0.0)
    close = sorted((k for k, score in scores.items() if score >= max(0.75, best - 0.03)), key=lambda k: -scores[k])
    same_name = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    return list(dict.fromkeys(close + same_name))[:count]


def overrides_from_args(args: str) -> tp.List[str]:
    """ARGS (one string, as the shell would split it) as Hydra overrides; a token written as a command-line flag
    (`--optim.epochs=3`) is refused with the way to write it, where Hydra or argparse would print a usage dump."""
    overrides = shlex.split(args)
    for token in overrides:
        if token.startswith("-"):
            raise OverrideError(
                f"ARGS: {token!r} is written as a flag; write each override as key=value, without dashes: "
                f"ARGS='{token.lstrip('-')}'."
            )
    return overrides


def check_override_keys(overrides: tp.Sequence[str], cfg: DictConfig, search_path: tp.Sequence[Path]) -> None:
    """Every override names a key of `cfg` (the config they apply to) or a config group, else OverrideError:
    `optim.epoch: no such key; did you mean optim.epochs?`. `+key=value` (add a key) is left to Hydra."""
    known = dotted_keys(cfg)
    for override in parse_overrides(overrides):
        key = override.key_or_group
        if override.is_add() or is_config_group(key, search_path):
            continue
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            close = closest_keys(key, known)
            hint = (
                f"did you mean {' or '.join(close)}?"
                if close
                else "the keys are those of config/solver/finetune/musicgen_small.yaml and AudioCraft's config tree"
            )
            raise OverrideError(f"{key}: no such key; {hint}")


def check_values(cfg: DictConfig) -> None:
    """The values of the keys in ALLOWED; OverrideError naming each problem."""
    problems = [
        problem
        for key, allowed in ALLOWED.items()
        if (problem := allowed.problem(key, OmegaConf.select(cfg, key, default=None)))
        and OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
    ]
    if problems:
        raise OverrideError("; ".join(problems) + ".")


_ABSENT = object()
