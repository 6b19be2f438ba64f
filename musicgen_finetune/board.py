"""`make board [XP=<signature>] [BOARD_PORT=6006]`: TensorBoard over output/xps (every run) or one experiment, on
localhost only, offline.

Each experiment writes `<xp>/tensorboard/` when its config says `logging.log_tensorboard: true` (watch.py).
TensorBoard serves its bundled page and reads the event files in Python (`--load_fast=false`: no data-server
binary); nothing is fetched from the network.
"""

import logging
import re
import threading
import typing as tp
from pathlib import Path

from .errors import UserError
from .paths import experiments_dir
from .watch import TENSORBOARD_DIR


class BoardError(UserError, RuntimeError):
    """No logs to show, or the port is taken."""


def log_dir(xp: tp.Optional[str] = None) -> Path:
    """output/xps, or one experiment's tensorboard/ folder (from its signature or its folder)."""
    if not xp:
        root = experiments_dir()
        if not root.is_dir():
            raise BoardError(f"No experiments in {root} yet: `make train` writes them, then `make board` shows them.")
        return root
    path = Path(xp).expanduser()
    folder = path if path.is_dir() else experiments_dir() / xp
    if not (folder / TENSORBOARD_DIR).is_dir():
        known = sorted(p.parent.name for p in experiments_dir().glob(f"*/{TENSORBOARD_DIR}"))
        raise BoardError(
            f"XP={xp}: no {TENSORBOARD_DIR}/ in {folder} (was it trained with logging.log_tensorboard=true?). "
            f"Experiments with TensorBoard logs: {', '.join(known) or 'none'}."
        )
    return (folder / TENSORBOARD_DIR).resolve()


class ResumedRunNote(logging.Filter):
    """TensorBoard's warning when it drops the updates an interrupted process logged past the checkpoint its run
    resumed from ("Detected out of order event.step likely caused by a TensorFlow restart. Purging expired events
    ...", tensorboard/backend/event_processing/plugin_event_accumulator.py `_Purge`) reads as a fault. It is what
    the resumed process asked for (its SummaryWriter's purge_step, watch.py), so it is said as that, one line."""

    # plugin_event_accumulator's wording (make board's reader); event_accumulator's says "Removing N scalars"
    PURGE = re.compile(r"Detected out of order event\.step.*?Purging (\d+) expired .*?current step: (\d+)", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.PURGE.search(record.getMessage())
        if found:
            scalars, step = found.groups()
            record.msg = (
                "a resumed run: %s values logged from update %s on by the process that was interrupted are replaced "
                "by the resumed process's (not an error)"
            )
            record.args = (scalars, step)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def explain_resumed_runs() -> None:
    """ResumedRunNote on TensorBoard's logger (tensorboard/util/tb_logging.py: logging.getLogger("tensorboard"))."""
    tensorboard_logger = logging.getLogger("tensorboard")
    if not any(isinstance(f, ResumedRunNote) for f in tensorboard_logger.filters):
        tensorboard_logger.addFilter(ResumedRunNote())


def serve(xp: tp.Optional[str] = None, port: int = 6006, host: str = "127.0.0.1") -> tp.NoReturn:
    """Start TensorBoard, print its address, serve until interrupted."""
    from tensorboard import program

    logdir = log_dir(xp)
    explain_resumed_runs()
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(logdir), "--host", host, "--port", str(port), "--load_fast=false"])
    try:
        url = board.launch()  # binds the port now and serves from a thread
    except program.TensorBoardServerException as err:
        raise BoardError(f"TensorBoard cannot listen on {host}:{port} ({err}): use another, BOARD_PORT=.") from None
    print(f"TensorBoard over {logdir}: {url} (Ctrl-C to stop)", flush=True)
    threading.Event().wait()
    raise AssertionError("unreachable")
