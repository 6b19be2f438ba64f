"""make export XP=<signature or folder> [OUT=<folder>] [WHICH=best|last]"""
import argparse
import sys

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune import export, model_dir, patches  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--xp", required=True)
parser.add_argument("--out", default=None)
parser.add_argument("--which", default="best", help="best (lowest validation loss) or last")
opts = parser.parse_args()
try:
    out = export.export(opts.xp, opts.out, opts.which)
except (export.ExportError, model_dir.ModelDirError, patches.UnsafeCheckpointError, ValueError) as err:
    sys.exit(f"error: {err}")
print(f"Exported to {out}\n  use it: make generate MODEL={out} PROMPTS='...'")
