"""An experiment folder, `output/xps/<signature>/`, as the stages after training read it.

    checkpoint.th   dora/flashy's checkpoint: weights, optimizer, history, the run's config (xp.cfg); its best state
                    a reference to its own weights or to best_state_<epoch>.th (checkpoints.py)
    history.json    one entry per epoch: {"train": {...}, "valid": {"ce": ...}, ...}
    done.json       written when a run ended for good: how (completed, early_stop) and its best epoch
    solver.log.0    the training log
    run.lock        held (flock) by the process training it: one run of an experiment at a time
    run.json        how the run stands, for `make runs` (runs.py); tensorboard/: its curves and samples (watch.py)

The best epoch is the one with the lowest validation metric (`ce` unless the run's `early_stop.metric` says
otherwise); with `early_stop.forgetting_budget`, the lowest among the epochs whose cross-entropy on the prior set
(`prior_ce`, prior.py) rose at most that fraction over the base's (`prior_ce_base`). `make export WHICH=best`
exports its state; done.json says which epoch and why.
"""

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import typing as tp
from pathlib import Path

from .errors import UserError
from .files import lock_held, write_text_atomically
from .paths import experiments_dir

CHECKPOINT_FILE = "checkpoint.th"
HISTORY_FILE = "history.json"
DONE_FILE = "done.json"
LOG_FILE = "solver.log.0"
LOCK_FILE = "run.lock"


class ExperimentRunningError(UserError, RuntimeError):
    """The experiment is being trained by another process."""


class RunLock:
    """`<xp>/run.lock`, held with flock by the process that trains the experiment: a second run of it refuses at
    once, naming the first; the kernel releases the lock when its process dies, so a killed run never blocks the
    next one. The file keeps the holder's pid, host and start time for whoever asks (`holder`)."""

    def __init__(self, folder: tp.Union[str, Path]):
        self.path = Path(folder) / LOCK_FILE
        self.file: tp.Optional[tp.IO[str]] = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise ExperimentRunningError(
                f"{self.path.parent} is being trained right now by {holder}: wait for it to end, or stop it "
                "(re-running the same command afterwards resumes from its last checkpoint)."
            ) from None
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc_info: tp.Any) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def is_running(folder: tp.Union[str, Path]) -> bool:
    """Whether a process holds the experiment's run lock now."""
    return lock_held(Path(folder) / LOCK_FILE)


class ExperimentNotFoundError(UserError, FileNotFoundError):
    """XP= names no experiment with a checkpoint; the message lists those that exist."""


@dataclasses.dataclass
class BestChoice:
    """The best epoch (1-based; None before any validation) and why it is."""

    epoch: tp.Optional[int]
    reason: str


def forgetting(valid: dict) -> tp.Optional[float]:
    """Relative rise of the cross-entropy on the prior set over the base's, in one epoch's validation metrics."""
    if valid.get("prior_ce") is None or not valid.get("prior_ce_base"):
        return None
    return valid["prior_ce"] / valid["prior_ce_base"] - 1


def choose_best(
    history: tp.Sequence[dict], metric: str = "ce", forgetting_budget: tp.Optional[float] = None
) -> BestChoice:
    """The epoch of the lowest validation `metric` (ties: the earlier); with a `forgetting_budget`, among the epochs
    whose forgetting (prior_ce over prior_ce_base, minus 1) is at most the budget, or, when none is, the epoch
    that forgot least."""
    valid = [(index + 1, epoch.get("valid", {})) for index, epoch in enumerate(history)]
    scores = [(v[metric], n) for n, v in valid if metric in v]
    if not scores:
        return BestChoice(None, "no validation yet")
    if forgetting_budget is None:
        return BestChoice(min(scores)[1], f"lowest valid {metric}")
    rises = {n: forgetting(v) for n, v in valid if metric in v}
    if any(rise is None for rise in rises.values()):
        return BestChoice(min(scores)[1], f"lowest valid {metric} (no prior_ce to measure forgetting with)")
    within = [(score, n) for score, n in scores if rises[n] <= forgetting_budget]
    over = sorted(n for n in rises if rises[n] > forgetting_budget)
    if within:
        epoch = min(within)[1]
        left_out = f"; over budget: epoch(s) {', '.join(map(str, over))}" if over else ""
        return BestChoice(
            epoch,
            f"lowest valid {metric} among the {len(within)} epoch(s) within the forgetting budget "
            f"(prior_ce at most {100 * forgetting_budget:g}% over the base's; epoch {epoch}: "
            f"{100 * rises[epoch]:+.1f}%){left_out}",
        )
    epoch = min((rise, n) for n, rise in rises.items())[1]
    return BestChoice(
        epoch,
        f"no epoch within the forgetting budget ({100 * forgetting_budget:g}%): the one that forgot least "
        f"(prior_ce {100 * rises[epoch]:+.1f}% over the base's)",
    )


def best_epoch(
    history: tp.Sequence[dict], metric: str = "ce", forgetting_budget: tp.Optional[float] = None
) -> tp.Optional[int]:
    """The 1-based best epoch of a dora history (choose_best), None before any validation."""
    return choose_best(history, metric, forgetting_budget).epoch


def run_choice(cfg: tp.Any, history: tp.Sequence[dict]) -> BestChoice:
    """choose_best with a run's own `early_stop.metric` and `early_stop.forgetting_budget` (its xp.cfg)."""
    early_stop = (cfg.get("early_stop") if cfg is not None else None) or {}
    return choose_best(history, early_stop.get("metric", "ce"), early_stop.get("forgetting_budget"))


def valid_value(history: tp.Sequence[dict], epoch: tp.Optional[int], metric: str = "ce") -> tp.Optional[float]:
    """The validation `metric` of 1-based `epoch`, or None."""
    if epoch is None or not 1 <= epoch <= len(history):
        return None
    return history[epoch - 1].get("valid", {}).get(metric)


def write_done(
    folder: Path, reason: str, history: tp.Sequence[dict], metric: str, forgetting_budget: tp.Optional[float] = None
) -> None:
    """`<xp>/done.json`: the run ended for good (not a stop_after_epoch pause), for `make grid` and reports."""
    choice = choose_best(history, metric, forgetting_budget)
    done = {
        "reason": reason,
        "epochs": len(history),
        "best_epoch": choice.epoch,
        "metric": metric,
        "forgetting_budget": forgetting_budget,
        "best_reason": choice.reason,
    }
    write_text_atomically(Path(folder) / DONE_FILE, json.dumps(done, indent=2) + "\n")


def read_done(folder: Path) -> tp.Optional[dict]:
    """done.json of an experiment folder, or None while it has not ended."""
    path = Path(folder) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_history(folder: Path) -> tp.List[dict]:
    """history.json of an experiment (or export) folder; [] when there is none."""
    path = Path(folder) / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def find_experiment(xp: tp.Union[str, Path]) -> Path:
    """An experiment folder with a checkpoint, from a signature (output/xps/<sig>) or a path."""
    path = Path(xp).expanduser()
    folder = path if path.is_dir() else experiments_dir() / str(xp)
    if not (folder / CHECKPOINT_FILE).is_file():
        known = sorted(p.name for p in experiments_dir().glob("*") if (p / CHECKPOINT_FILE).is_file())
        raise ExperimentNotFoundError(
            f"XP={xp}: no {CHECKPOINT_FILE} in {folder}. Experiments with a checkpoint: {', '.join(known) or 'none'} "
            "(make train prints the signature)."
        )
    return folder.resolve()
