"""make export XP=<signature or folder> [OUT=<folder>] [WHICH=best|last]"""

import argparse

from musicgen_finetune import cli, export


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--xp", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--which", default="best", help="best (lowest validation loss) or last")
    opts = parser.parse_args(argv)
    out = export.export(opts.xp, opts.out, opts.which)
    print(f"Exported to {out}\n  use it: make generate MODEL={out} PROMPTS='...'")


if __name__ == "__main__":
    cli.main(main)
