"""Dora grids (`dora grid <name>` on Slurm, `make grid GRID=<name>` on one machine).

Each grid is a few lines: the experiments to compare, on top of the same base a `make train` would run, which is
read from the environment (MODEL, NAME, and optionally T5, PRESET), so one grid serves any model and dataset.
"""
