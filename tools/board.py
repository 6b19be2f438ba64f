"""make board [XP=<signature>] [BOARD_PORT=6006]: TensorBoard over output/xps (or one experiment) on localhost."""

import argparse

from musicgen_finetune import board, cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--xp", default=None, help="one experiment (signature or folder); default: all of output/xps")
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--host", default="127.0.0.1")
    opts = parser.parse_args(argv)
    board.serve(opts.xp, opts.port, opts.host)


if __name__ == "__main__":
    cli.main(main)
