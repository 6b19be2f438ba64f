"""Pieces of our solver that need no training run (the runs are in test_train_e2e.py)."""

import pytest
import torch

from musicgen_finetune.data.dataset import count_segments
from musicgen_finetune.solver import split_batch


def test_split_batch_covers_every_item_once():
    audio = torch.arange(5).view(5, 1, 1).float()
    infos = list("abcde")
    parts = split_batch((audio, infos), 2)
    assert [len(p[1]) for p in parts] == [2, 3] or [len(p[1]) for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p[0] for p in parts]), audio)
    assert sum((p[1] for p in parts), []) == infos


def test_split_batch_of_cached_tokens():
    parts = split_batch((list(range(4)),), 4)
    assert [p[0] for p in parts] == [[0], [1], [2], [3]]


def test_a_batch_smaller_than_the_split_goes_one_item_a_micro_batch():
    """An epoch's last batch (or one process's share of it) can hold fewer items than micro-batches."""
    parts = split_batch((torch.arange(2).view(2, 1, 1).float(), ["a", "b"]), 4)
    assert [p[1] for p in parts] == [["a"], ["b"]]


def test_count_segments(dataset, tmp_path):
    lines = (dataset / "train" / "data.jsonl").read_text().splitlines()
    assert count_segments(str(dataset / "train")) == len(lines)
    with pytest.raises(FileNotFoundError, match="make manifests"):
        count_segments(str(tmp_path))


def bare_solver(cfg: dict, folder=None, history=()):
    """A FinetuneSolver without its __init__ (no model, data or dora run): the methods under test run for real, on
    the attributes upstream's __init__ would have set, given here by hand. flashy keeps the history in the dora xp
    (solver.history is xp.link.history), so a stand-in xp holds it."""
    import logging
    from pathlib import Path
    from types import SimpleNamespace

    import flashy
    from omegaconf import OmegaConf

    from musicgen_finetune.solver import FinetuneSolver

    solver = object.__new__(FinetuneSolver)
    solver.cfg = OmegaConf.create({"fsdp": {"use": False}, **cfg})
    solver.xp = SimpleNamespace(link=SimpleNamespace(history=list(history)), folder=Path(folder) if folder else None)
    solver.stateful = flashy.state.StateManager()  # nothing registered: upstream's (load_)state_dict add nothing
    solver.logger = logging.getLogger("test_solver")
    solver._pending_metrics = {}
    return solver
