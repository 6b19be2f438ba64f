"""make import-hf HF=<transformers MusicGen folder> [OUT=<folder>] [PAD_MODE=constant|reflect]"""
import argparse
import sys
from pathlib import Path

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune import hf_bridge, model_dir, output_dir  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--hf", required=True, help="a folder written by MusicgenForConditionalGeneration."
                    "save_pretrained + AutoProcessor.save_pretrained")
parser.add_argument("--out", default=None, help="default: <output>/models/<name of --hf>")
parser.add_argument("--pad-mode", default=None, choices=hf_bridge.PAD_MODES,
                    help="EnCodec padding mode (default: the transformers config's)")
opts = parser.parse_args()
out = Path(opts.out) if opts.out else output_dir() / "models" / Path(opts.hf).resolve().name
try:
    out = hf_bridge.import_hf(opts.hf, out, pad_mode=opts.pad_mode)
    files = model_dir.check(out)
except (hf_bridge.ConversionError, model_dir.ModelDirError) as err:
    sys.exit(f"error: {err}")
print(f"Imported to {out}\n  {files.describe()}\n  train it: make train MODEL={out} NAME=<dataset>")
