"""make listen REPORT=output/reports/<name> [PORT=8000]: serve a report; its blind A/B choices go to
choices.json in the report folder."""

import argparse
from pathlib import Path

from musicgen_finetune import cli
from musicgen_finetune.evaluation import server


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", help="a folder written by make eval")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    opts = parser.parse_args(argv)
    server.serve(Path(opts.report), opts.port, opts.host)


if __name__ == "__main__":
    cli.main(main)
