"""Synthesise the hip-hop 808 demo dataset: python egs/hiphop808/make_data.py --out output/data/hiphop808

--style chiptune writes the demo's other style, which its "general" base model is first trained on."""

import argparse

from musicgen_finetune import cli
from musicgen_finetune.data.synthetic import STYLES, write_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=808)
    parser.add_argument("--style", default="808", choices=list(STYLES))
    opts = parser.parse_args(argv)
    out = write_dataset(opts.out, opts.count, opts.seconds, opts.seed, opts.style)
    print(f"{opts.style} dataset: {opts.count} clips of {opts.seconds:g} s in {out} (captions in metadata.json)")


if __name__ == "__main__":
    cli.main(main)
