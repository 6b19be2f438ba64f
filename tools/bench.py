"""make bench [QUICK=1] [BENCH_ARGS=...]: speed and memory to output/bench/ (bench.json, bench.md); --help lists
the options."""

from musicgen_finetune import cli
from musicgen_finetune.bench import run


def main(argv=None) -> None:
    print(f"Written to {run.main(argv)}")


if __name__ == "__main__":
    cli.main(main)
