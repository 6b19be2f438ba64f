"""make doctor [MODEL=<musicgen folder>] [T5=<folder>]: is this machine ready, and if not, what to do."""

import argparse

from musicgen_finetune import cli, doctor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--t5", default=None)
    opts = parser.parse_args(argv)
    return doctor.run(opts.model, opts.t5)


if __name__ == "__main__":
    cli.main(main)
