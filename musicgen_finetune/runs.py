"""`make runs`: one table of every experiment in output/xps, read from the small `run.json` each run keeps.

`<xp>/run.json` is written by the training process (watch.py) when an epoch starts the run, after every epoch and
when the run returns:

    state           running | completed | early_stop | paused (stop_after_epoch; re-running resumes)
    epochs_done, epochs_planned, best_epoch, best_valid (the validation `metric`, ce unless early_stop.metric)
    model           the folder it continued from; dataset (manifests/<name>); lora (its settings, or null)

A run that says `running` while nobody holds its run.lock was killed or crashed: the table says `interrupted`
(re-running the same `make train` resumes it). Reading a hundred experiments takes a hundred small files and
locks, no checkpoint.
"""

import datetime
import json
import typing as tp
from pathlib import Path

from .data.versions import VERSIONS_FOLDER
from .experiments import best_epoch, is_running, valid_value
from .files import write_text_atomically
from .models.folder import PRETRAINED_PREFIX
from .paths import experiments_dir

STATUS_FILE = "run.json"
COLUMNS = ("signature", "model", "dataset", "kind", "epochs", "best", "valid", "state", "folder")


def dataset_name(split_manifest: tp.Optional[str]) -> tp.Optional[str]:
    """manifests/<name>/{train,valid}(.jsonl), or the version a run pinned, manifests/.versions/<name>/<time>/valid,
    -> <name>."""
    if not split_manifest:
        return None
    path = Path(split_manifest)
    folder = path.parent if path.name.startswith(("train", "valid")) else path
    return folder.parent.name if folder.parent.parent.name == VERSIONS_FOLDER else folder.name


def write_status(
    folder: Path,
    state: str,
    history: tp.Sequence[dict],
    epochs_planned: int,
    metric: str,
    model: tp.Optional[str],
    valid_manifest: tp.Optional[str],
    lora: tp.Optional[dict],
    forgetting_budget: tp.Optional[float] = None,
) -> None:
    best = best_epoch(history, metric, forgetting_budget)  # the epoch `make export WHICH=best` takes
    if model and model.startswith(PRETRAINED_PREFIX):
        model = model[len(PRETRAINED_PREFIX) :]
    status = {
        "state": state,
        "epochs_done": len(history),
        "epochs_planned": epochs_planned,
        "best_epoch": best,
        "best_valid": valid_value(history, best, metric),
        "metric": metric,
        "model": model,
        "dataset": dataset_name(valid_manifest),
        "lora": lora,
        "updated": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    write_text_atomically(Path(folder) / STATUS_FILE, json.dumps(status, indent=2) + "\n")


def read_run(folder: Path) -> tp.Optional[dict]:
    """One row of the table, or None for a folder no run of ours has written to."""
    path = folder / STATUS_FILE
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # being replaced right now is atomic; anything else is not ours
        return None
    state = status.get("state")
    if state == "running" and not is_running(folder):
        state = "interrupted"
    return {
        "signature": folder.name,
        "model": status.get("model"),
        "dataset": status.get("dataset"),
        "lora": status.get("lora"),
        "epochs_done": status.get("epochs_done"),
        "epochs_planned": status.get("epochs_planned"),
        "best_epoch": status.get("best_epoch"),
        "best_valid": status.get("best_valid"),
        "metric": status.get("metric", "ce"),
        "state": state,
        "updated": status.get("updated"),
        "folder": str(folder),
    }


def read_runs(root: tp.Optional[Path] = None) -> tp.List[dict]:
    """Every experiment under `root` (output/xps) with a run.json, the most recently updated first."""
    root = Path(root) if root is not None else experiments_dir()
    rows = [row for folder in sorted(root.glob("*")) if folder.is_dir() for row in [read_run(folder)] if row]
    return sorted(rows, key=lambda row: row["updated"] or "", reverse=True)


def table_row(run: dict) -> tp.Tuple[str, ...]:
    model = Path(run["model"]).name if run["model"] else "-"
    lora = run["lora"]
    kind = f"LoRA r{lora.get('rank')}" if lora else "full"
    valid = f"{run['metric']} {run['best_valid']:.4f}" if run["best_valid"] is not None else "-"
    return (
        run["signature"],
        model,
        run["dataset"] or "-",
        kind,
        f"{run['epochs_done']}/{run['epochs_planned']}",
        str(run["best_epoch"] or "-"),
        valid,
        run["state"],
        run["folder"],
    )


def format_table(rows: tp.Sequence[dict]) -> str:
    if not rows:
        return f"No experiments in {experiments_dir()} yet (make train writes them)."
    cells = [COLUMNS] + [table_row(run) for run in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)
