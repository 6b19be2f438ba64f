"""`make grid GRID=<name>`: a dora grid on one machine, no Slurm.

Dora's `grid` command submits through Slurm only (`srun`). Here the grid's experiments are listed the way
`dora grid --dry_run` lists them, each runs in turn through `dora run` (on all GPUs with GPUS>1), experiments that
already ended are skipped, and dora's own table is printed with each one's metrics. The same grid file still runs on
a cluster with `dora -P musicgen_finetune grid <name>`.
"""

import importlib
import os
import shlex
import subprocess
import sys
import typing as tp
from pathlib import Path

from dora.grid import RunGridArgs, monitor, run_grid

from . import grids
from .experiments import LOG_FILE, read_done
from .launch import LaunchError, check_batch, check_device, dora_command, processes_of
from .train import main


def load_explorer(name: str):
    folder = Path(grids.__file__).parent
    available = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    if name not in available:
        raise LaunchError(f"GRID={name}: there is no musicgen_finetune/grids/{name}.py. Grids: {', '.join(available)}.")
    return importlib.import_module(f"{grids.__name__}.{name}").explorer


def list_experiments(name: str, explorer) -> list:
    """The grid's experiments (dora sheeps), as `dora grid --dry_run` computes them; nothing is scheduled."""
    args = RunGridArgs(monitor=False, silent=True, dry_run=True)
    return run_grid(main, explorer, name, args=args)


def print_table(explorer, sheeps: list) -> None:
    monitor(RunGridArgs(), main, explorer, sheeps, print)


def run_experiment(argv: tp.Sequence[str], processes: int) -> int:
    command = dora_command(argv, processes)
    print("Running: " + shlex.join(command), flush=True)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(command, env=env).returncode


def run(name: str, gpus: tp.Union[int, str] = 1) -> tp.List[str]:
    """Run every experiment of grid `name` not yet ended; print the table; return the signatures that failed."""
    processes = processes_of(gpus)
    explorer = load_explorer(name)
    sheeps = list_experiments(name, explorer)
    for sheep in sheeps:  # here they run on this machine: its devices must do
        check_device(sheep.xp.cfg, how=f"make grid GRID={name}")
        check_batch(sheep.xp.cfg, processes)
    print(f"Grid {name}: {len(sheeps)} experiments in {sheeps[0].xp.folder.parent if sheeps else '-'}", flush=True)
    failed = []
    for index, sheep in enumerate(sheeps):
        done = read_done(sheep.xp.folder)
        if done:
            print(f"[{index + 1}/{len(sheeps)}] {sheep.xp.sig}: already ended ({done['reason']}), skipped")
            continue
        print(f"[{index + 1}/{len(sheeps)}] {sheep.xp.sig}: {shlex.join(sheep.xp.argv)}", flush=True)
        if run_experiment(sheep.xp.argv, processes) != 0:
            print(f"{sheep.xp.sig} failed; its log: {sheep.xp.folder / LOG_FILE}. Going on with the others.")
            failed.append(sheep.xp.sig)
    print_table(explorer, sheeps)
    return failed
