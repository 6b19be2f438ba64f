"""make generate MODEL=<folder> PROMPTS=<file or "text"> [ADAPTER=] [DURATION=10] [SEED=0] [OUT=] ..."""
import argparse
import sys

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune import generate, lora, model_dir, output_dir  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", required=True)
parser.add_argument("--prompts", required=True, help="a text file, one prompt a line, or the prompt itself")
parser.add_argument("--adapter", default=None, help="LoRA adapters.safetensors to apply on the model")
parser.add_argument("--duration", type=float, default=10.0)
parser.add_argument("--seeds", default="0", help="comma-separated seeds, one wav per prompt and seed")
parser.add_argument("--out", default=None)
parser.add_argument("--top-k", type=int, default=250)
parser.add_argument("--top-p", type=float, default=0.0)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance coefficient")
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--t5", default=None, help="local T5 folder (default: found like make train finds it)")
opts = parser.parse_args()
try:
    seeds = [int(s) for s in opts.seeds.split(",") if s.strip()]
except ValueError:
    sys.exit(f"error: SEED={opts.seeds!r}: use integers, comma-separated (SEED=0,1,2).")
name = opts.model.rstrip("/").split("/")[-1]
if opts.adapter:  # never overwrite the base model's samples with the adapted model's
    name += "+" + opts.adapter.rstrip("/").split("/")[-2 if opts.adapter.endswith(".safetensors") else -1]
out = opts.out or output_dir() / "samples" / generate.slug(name)
try:
    folder = generate.generate(opts.model, opts.prompts, out, opts.adapter, opts.duration, seeds, opts.top_k,
                               opts.top_p, opts.temperature, opts.cfg, opts.batch, progress=sys.stderr.isatty(),
                               t5=opts.t5)
except (generate.GenerationError, model_dir.ModelDirError, lora.AdapterMismatchError, FileNotFoundError) as err:
    sys.exit(f"error: {err}")
print(f"Generated into {folder} (generated.json lists prompts, seeds and settings)")
