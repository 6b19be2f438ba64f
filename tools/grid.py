"""make grid GRID=<name> MODEL=... NAME=... [PRESET=...] [GPUS=all]: a dora grid, one experiment after another.

The grid reads MODEL, NAME, T5 and PRESET from the environment (as `dora grid` on a cluster does)."""

import argparse

from musicgen_finetune import cli, grid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a grid in musicgen_finetune/grids/ (full_vs_lora, lora_rank_lr, ...)")
    parser.add_argument("--gpus", default="1", help="processes per experiment: a number, or all (every GPU)")
    opts = parser.parse_args(argv)
    failed = grid.run(opts.name, gpus=opts.gpus)
    if failed:
        print(f"{len(failed)} experiment(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    cli.main(main)
