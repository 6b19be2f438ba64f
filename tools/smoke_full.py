"""make smoke-full: every stage at musicgen-small's size on the CPU (random weights, offline); times and peak memory
per stage to output/bench/smoke_full.json."""

import argparse
from pathlib import Path

from musicgen_finetune import cli
from musicgen_finetune.bench import smoke_full


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="default: output/bench/smoke_full.json")
    opts = parser.parse_args(argv)
    print(f"Written to {smoke_full.main(opts.out and Path(opts.out))}")


if __name__ == "__main__":
    cli.main(main)
