"""make tiny-model [TINY=output/models/tiny-musicgen]: the embedded default model (kept if already written)."""
import argparse
from pathlib import Path

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune.tiny_model import write_tiny_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--force", action="store_true", help="rewrite even if the folder is complete")
opts = parser.parse_args()
out = Path(opts.out)
if opts.force or not (out / "state_dict.bin").is_file():
    write_tiny_model(out, seed=opts.seed)
print(f"Tiny model: {out.resolve()}")
