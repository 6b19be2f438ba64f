"""make export-hf MODEL=<AudioCraft model folder> [OUT=<folder>] [BASE_HF=<transformers MusicGen folder>]"""
import argparse
import sys
from pathlib import Path

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune import hf_bridge, model_dir, output_dir, patches  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", required=True, help="an AudioCraft model folder (make export, the tiny model, ...)")
parser.add_argument("--out", default=None, help="default: <output>/exports/<name of --model>-hf")
parser.add_argument("--base-hf", default=None,
                    help="take the text and audio encoders and the processor from this transformers MusicGen")
opts = parser.parse_args()
out = Path(opts.out) if opts.out else output_dir() / "exports" / f"{Path(opts.model).resolve().name}-hf"
try:
    out = hf_bridge.export_hf(opts.model, out, base_hf=opts.base_hf)
except (hf_bridge.ConversionError, model_dir.ModelDirError, patches.UnsafeCheckpointError) as err:
    sys.exit(f"error: {err}")
print(f"Exported to {out}\n  load it: MusicgenForConditionalGeneration.from_pretrained('{out}'), "
      f"AutoProcessor.from_pretrained('{out}')")
