"""make import-hf HF=<transformers MusicGen folder> [OUT=<folder>] [PAD_MODE=constant|reflect]"""

import argparse
from pathlib import Path

from musicgen_finetune import cli, output_dir
from musicgen_finetune.models.folder import check
from musicgen_finetune.models.hf.configs import PAD_MODES
from musicgen_finetune.models.hf.convert import import_hf


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--hf",
        required=True,
        help="a folder written by MusicgenForConditionalGeneration.save_pretrained + AutoProcessor.save_pretrained",
    )
    parser.add_argument("--out", default=None, help="default: <output>/models/<name of --hf>")
    parser.add_argument(
        "--pad-mode", default=None, choices=PAD_MODES, help="EnCodec padding mode (default: the transformers config's)"
    )
    opts = parser.parse_args(argv)
    out = Path(opts.out) if opts.out else output_dir() / "models" / Path(opts.hf).resolve().name
    out = import_hf(opts.hf, out, pad_mode=opts.pad_mode)
    print(f"Imported to {out}\n  {check(out).describe()}\n  train it: make train MODEL={out} NAME=<dataset>")


if __name__ == "__main__":
    cli.main(main)
