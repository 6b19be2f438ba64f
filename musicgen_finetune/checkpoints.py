"""Lean training checkpoints, written off the training loop's critical path.

Upstream's end of an epoch (solvers/base.py:282 `save_checkpoints`) writes `checkpoint.th` with the weights, the
optimizer (AdamW's two moments) and `best_state`, a second whole copy of the weights (solvers/base.py:64), and the
training loop waits for the write: 6.7 GB for musicgen-small after every epoch. Here, for a run without FSDP:

    <xp>/checkpoint.th          weights, optimizer, history, random states; `best_state` is a reference:
                                {"lean": {"epoch": k, "file": null}}            the best epoch is this one
                                {"lean": {"epoch": k, "file": "best_state_k.th"}}  it is in that file
    <xp>/best_state_<k>.th      {"epoch": k, "best_state": {...}}: the best epoch's weights in fp16 (the released
                                checkpoints' precision), written once, when a later checkpoint first needs it

The solver keeps its in-memory best state in fp16 too (upstream's BestStateDictManager `dtype`), so a resumed run
holds exactly what the uninterrupted one does. A checkpoint is a snapshot of the state taken at the end of the
epoch (tensors copied to host memory), written by one background thread; each file is written beside its name and
renamed over it (files.write_atomically), so a reader or a resumed run sees the previous file or the new one, never
part of one. Best-state files that no checkpoint refers to are removed once the checkpoint that replaced them is
in place, and at start (with leftovers of an interrupted write).
"""

import copy
import threading
import time
import typing as tp
from pathlib import Path

import torch

from .errors import UserError
from .files import write_atomically
from .patches import safe_load

LEAN_KEY = "lean"
BEST_DTYPE = torch.float16  # the released musicgen checkpoints' precision (state_dict.bin)


class MissingBestStateError(UserError, FileNotFoundError):
    """A checkpoint refers to a best-state file that is gone."""


def best_file_name(epoch: int) -> str:
    return f"best_state_{epoch}.th"


def reference(epoch: int, in_file: bool) -> dict:
    """The `best_state` entry of a lean checkpoint: the best epoch, and the file holding it unless it is the
    checkpoint's own weights."""
    return {LEAN_KEY: {"epoch": epoch, "file": best_file_name(epoch) if in_file else None}}


def referenced(best_state: tp.Any) -> tp.Optional[dict]:
    """{"epoch", "file"} when `best_state` (a checkpoint's entry) is a reference, None for upstream's full copy."""
    if isinstance(best_state, dict) and set(best_state) == {LEAN_KEY}:
        return best_state[LEAN_KEY]
    return None


def in_best_precision(state: tp.Mapping[str, torch.Tensor]) -> tp.Dict[str, torch.Tensor]:
    """What upstream's `copy_state(..., dtype=fp16)` makes of weights (utils/utils.py:251): floating tensors in fp16."""
    return {k: v.to(BEST_DTYPE) if v.is_floating_point() else v for k, v in state.items()}


def resolve_best_state(folder: tp.Union[str, Path], checkpoint: dict) -> dict:
    """A checkpoint's `best_state` as upstream's solvers expect it ({source: weights}), read from its best-state
    file or made from the checkpoint's own weights; a full copy (upstream's checkpoints) as it is."""
    ref = referenced(checkpoint.get("best_state"))
    if ref is None:
        return checkpoint["best_state"]
    if ref["file"] is None:  # LoRA runs keep their best adapters in fp32 (MB; fp16 would round what PEFT reads)
        model = checkpoint["model"]
        return {"model": dict(model) if checkpoint.get("lora") else in_best_precision(model)}
    path = Path(folder) / ref["file"]
    if not path.is_file():
        raise MissingBestStateError(
            f"{path} is missing: {Path(folder) / 'checkpoint.th'} keeps its best epoch ({ref['epoch']}) there. Put "
            "it back, or use the last state (make export WHICH=last; a new training run: FRESH=1)."
        )
    saved = safe_load(path)
    if saved.get("epoch") != ref["epoch"]:
        raise MissingBestStateError(f"{path} holds epoch {saved.get('epoch')}, not {ref['epoch']}: it was replaced.")
    return saved["best_state"]


def snapshot(value: tp.Any, copy_tensors: bool = True) -> tp.Any:
    """A copy of a state (nested dicts, lists, tensors, configs) that training cannot change any more: tensors copied
    to host memory, everything else deep-copied. `copy_tensors=False` after the run's last epoch, when nothing will
    change the tensors while they are written (the copy of musicgen-small's 5 GB is seconds on a CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True) if copy_tensors else value.detach()
    if isinstance(value, dict):
        return {k: snapshot(v, copy_tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v, copy_tensors) for v in value)
    return copy.deepcopy(value)


def tensor_bytes(value: tp.Any) -> int:
    """Bytes of the tensors in a nested state (what a write of it costs, give or take its pickled metadata)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def remove_partials(folder: Path) -> None:
    """What an interrupted checkpoint write left: files.write_atomically names its files `.<name>.<random>.partial`.
    Called at start, while the run lock is held (nothing else writes there)."""
    for path in Path(folder).glob(".*.partial"):
        if path.name.startswith((".checkpoint", ".best_state_")):
            path.unlink(missing_ok=True)


def remove_unreferenced(folder: Path, keep: tp.Optional[str]) -> None:
    """Best-state files other than `keep` (the one the checkpoint on disk refers to)."""
    for path in Path(folder).glob("best_state_*.th"):
        if path.name != keep:
            path.unlink(missing_ok=True)


def save(state: tp.Any, path: Path) -> None:
    """torch.save into an open file, as upstream's utils/checkpoint.py:_safe_save_checkpoint does."""
    with open(path, "wb") as file:
        torch.save(state, file)


class BackgroundWriter:
    """Writes one checkpoint at a time in a thread: `start` returns at once, `wait` blocks until the write in flight
    (if any) is done and re-raises its error. The thread is not a daemon: an interpreter exiting on an error still
    finishes the write it started (a SIGKILL leaves a partial file, which the next start removes)."""

    def __init__(self, logger):
        self.logger = logger
        self.thread: tp.Optional[threading.Thread] = None
        self.error: tp.Optional[BaseException] = None
        self.written: tp.List[tp.Tuple[Path, int, float]] = []  # (path, bytes, seconds) of the last checkpoint

    def start(self, files: tp.Sequence[tp.Tuple[Path, tp.Any]], keep_best: tp.Optional[str]) -> None:
        """Write `files` [(path, state)] in order (best-state file before the checkpoint that refers to it), then
        remove the best-state files the new checkpoint does not refer to."""
        self.wait()

        def write() -> None:
            try:
                written = []
                for path, state in files:
                    begin = time.time()
                    write_atomically(path, lambda tmp, state=state: save(state, tmp))
                    written.append((path, path.stat().st_size, time.time() - begin))
                remove_unreferenced(files[-1][0].parent, keep_best)
                self.written = written
                self.logger.info(
                    "Checkpoint written in the background: %s",
                    ", ".join(f"{p.name} {size / 1e6:,.1f} MB in {seconds:.1f} s" for p, size, seconds in written),
                )
            except BaseException as err:  # re-raised in the training thread by wait()
                self.error = err

        self.thread = threading.Thread(target=write, name="checkpoint-writer", daemon=False)
        self.thread.start()

    def wait(self) -> float:
        """Block until the write in flight is done; the seconds waited. Re-raises the write's error."""
        begin = time.time()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return time.time() - begin
