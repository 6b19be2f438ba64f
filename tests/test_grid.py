"""`make grid`: a dora grid run on one machine through real `dora run`, then dora's table."""

import re

import pytest
import torch
from conftest import DATASET, run_tool, xp_folder


def run_grid(workdir, model, grid="full_vs_lora"):
    env = {"MODEL": str(model), "NAME": DATASET, "PRESET": "finetune/cpu_tiny"}
    return run_tool(["tools/grid.py", grid], workdir, extra_env=env)


def table_rows(stdout: str) -> dict:
    """signature -> (status, valid ce) from dora's table (colour codes stripped)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    rows = {}
    for match in re.finditer(
        r"^\d+\s+\S+\s+N/A\s+(\w{8})\s.*\|\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+\|\s+(\w+)\s+\d+\s*$", plain, re.MULTILINE
    ):
        rows[match.group(1)] = (match.group(3), float(match.group(2)))
    return rows


@pytest.mark.long  # a dora grid of several runs
def test_grid_runs_each_experiment_once_and_tables_both(first_run, workdir, tiny_model):
    result = run_grid(workdir, tiny_model)
    assert result.returncode == 0, result.stderr[-3000:]
    full_sig = xp_folder(first_run).name
    # the grid's full fine-tune is `make train`'s experiment (same signature): already ended, so skipped
    assert f"{full_sig}: already ended (completed), skipped" in result.stdout
    assert result.stdout.count("Running: dora -P musicgen_finetune run") == 1
    rows = table_rows(result.stdout)
    assert len(rows) == 2 and full_sig in rows, result.stdout
    assert all(status == "completed" for status, _ in rows.values())

    again = run_grid(workdir, tiny_model)
    assert again.returncode == 0
    assert "Running:" not in again.stdout and again.stdout.count("already ended") == 2
    assert table_rows(again.stdout) == rows


def test_grid_names_what_is_missing(monkeypatch):
    import pytest

    from musicgen_finetune import grid
    from musicgen_finetune.launch import LaunchError

    monkeypatch.setenv("MODEL", "")
    monkeypatch.setenv("NAME", "")
    with pytest.raises(LaunchError, match="set both"):
        grid.run("full_vs_lora")
    with pytest.raises(LaunchError, match="GRID=no_such_grid.*full_vs_lora"):
        grid.run("no_such_grid")


@pytest.mark.long  # a dora grid of several runs
def test_grid_lists_on_a_machine_without_gpu_but_runs_only_where_it_can(workdir, tiny_model, dataset, monkeypatch):
    """`dora grid` lists a GPU grid on a Slurm login node (no GPU); `make grid` here refuses it before running."""
    env = {"MODEL": str(tiny_model), "NAME": DATASET, "PRESET": "finetune/musicgen_small"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from musicgen_finetune.grid import list_experiments, load_explorer

    sheeps = list_experiments("full_vs_lora", load_explorer("full_vs_lora"))
    assert [sheep.xp.cfg.device for sheep in sheeps] == ["cuda", "cuda"]
    assert [sheep.xp.cfg.lora.enabled for sheep in sheeps] == [False, True]
    local = run_tool(["tools/grid.py", "full_vs_lora"], workdir, extra_env=env)
    assert local.returncode != 0 and "CUDA GPU" in local.stderr and "Running:" not in local.stdout
