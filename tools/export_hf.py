"""make export-hf MODEL=<AudioCraft model folder> [OUT=<folder>] [BASE_HF=<transformers MusicGen folder>]"""

import argparse
from pathlib import Path

from musicgen_finetune import cli, output_dir
from musicgen_finetune.models.hf.convert import export_hf


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="an AudioCraft model folder (make export, the tiny model, ...)")
    parser.add_argument("--out", default=None, help="default: <output>/exports/<name of --model>-hf")
    parser.add_argument(
        "--base-hf",
        default=None,
        help="take the text and audio encoders and the processor from this transformers MusicGen",
    )
    opts = parser.parse_args(argv)
    out = Path(opts.out) if opts.out else output_dir() / "exports" / f"{Path(opts.model).resolve().name}-hf"
    out = export_hf(opts.model, out, base_hf=opts.base_hf)
    print(
        f"Exported to {out}\n  load it: MusicgenForConditionalGeneration.from_pretrained('{out}'), "
        f"AutoProcessor.from_pretrained('{out}')"
    )


if __name__ == "__main__":
    cli.main(main)
