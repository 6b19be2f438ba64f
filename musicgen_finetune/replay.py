"""Replay of real general data (`replay.dataset`, `make train ... GENERAL=<dataset>`): that dataset's train split mixed
into the run's, at `replay.share` of the draws.

AudioCraft's sampler draws each segment with probability proportional to its manifest `weight` (times its duration:
`dataset.sample_on_weight` and `sample_on_duration`, both true upstream, audio_dataset.py:303-304). The mixed
manifest, `<xp>/replay/train/data.jsonl`, keeps the run's own rows and weights (augmented variants included) and
gives the general rows weights summing to share / (1 - share) of the run's total, so a draw is general with
probability `share` (for segments of equal duration, which `make manifests` cuts). An epoch stays as many draws as
the run's own manifest lists: replay takes a share of them, it does not lengthen training.
"""

import json
import typing as tp
from pathlib import Path

from .data.dataset import MANIFEST, PreparedDataset
from .errors import UserError
from .files import write_text_atomically

FOLDER = "replay"


class ReplayConfigError(UserError, ValueError):
    """A `replay.*` value that cannot work; the message names it."""


def read_rows(split_path: tp.Union[str, Path]) -> tp.List[dict]:
    path = Path(split_path)
    path = path / MANIFEST if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mixed_rows(own: tp.List[dict], general: tp.List[dict], share: float) -> tp.List[dict]:
    """`own` rows as they are, then `general` rows reweighted to `share` of the total weight."""
    if not 0 < share < 1:
        raise ReplayConfigError(f"replay.share={share}: give a share of the draws between 0 and 1 (e.g. 0.2).")
    if not general:
        raise ReplayConfigError("replay.dataset: its train manifest lists no segment.")
    own_total = sum(float(r.get("weight") or 1.0) for r in own)
    general_total = sum(float(r.get("weight") or 1.0) for r in general)
    scale = share / (1 - share) * own_total / general_total
    return [*own, *({**r, "weight": float(r.get("weight") or 1.0) * scale} for r in general)]


def mix_into_train(solver) -> None:
    """Point `datasource.train` at the mixed manifest, written into the experiment folder (every process writes the
    same file, atomically, and reads its own), when `replay.dataset` is set."""
    replay = solver.cfg.get("replay") or {}
    if not replay.get("dataset"):
        return
    general = getattr(solver, "general_dataset", None) or PreparedDataset(replay.dataset, "GENERAL")
    own_path = solver.cfg.datasource.train
    own = read_rows(own_path)
    rows = mixed_rows(own, general.rows("train"), float(replay.share))
    out = Path(solver.folder) / FOLDER / "train" / MANIFEST
    write_text_atomically(out, "".join(json.dumps(r) + "\n" for r in rows))
    if solver.cfg.dataset.train.get("num_samples") is None:
        solver.cfg.dataset.train.num_samples = len(own)  # the epoch's size stays the run's own
    solver.cfg.datasource.train = str(out.parent)
    solver.logger.info(
        "Replay: %d segments of %s mixed into the %d of %s at %.0f%% of the draws (replay.share=%g); manifest %s",
        len(rows) - len(own),
        general.name,
        len(own),
        own_path,
        100 * float(replay.share),
        float(replay.share),
        out,
    )
