"""make tiny-model: the embedded tiny model (kept if already written with the same settings)."""

import argparse
import json
from pathlib import Path

from musicgen_finetune import cli
from musicgen_finetune.models.tiny import CODEC_RECIPE, CODEC_STEPS, write_tiny_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rewrite even if the folder is complete")
    parser.add_argument(
        "--train-codec-on",
        nargs="*",
        default=[],
        metavar="FOLDER",
        help="train the tiny codec briefly on these folders' wavs, so its audio keeps their styles",
    )
    parser.add_argument("--codec-steps", type=int, default=CODEC_STEPS)
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    wanted = {
        "seed": opts.seed,
        "codec_trained_on": [str(Path(d).resolve()) for d in opts.train_codec_on],
        "codec_steps": opts.codec_steps if opts.train_codec_on else 0,
        "codec_recipe": CODEC_RECIPE if opts.train_codec_on else 0,
    }
    written = json.loads((out / "tiny_model.json").read_text()) if (out / "tiny_model.json").is_file() else {}
    if opts.force or not (out / "state_dict.bin").is_file() or any(written.get(k) != v for k, v in wanted.items()):
        write_tiny_model(out, seed=opts.seed, codec_data=opts.train_codec_on, codec_steps=opts.codec_steps)
    print(f"Tiny model: {out.resolve()}")


if __name__ == "__main__":
    cli.main(main)
