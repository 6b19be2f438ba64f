"""make manifests DATA=<folder with metadata.json> NAME=<dataset> [VALID=0.25] [TEXT='default caption']"""
import argparse
import sys

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune.data import DatasetError, build_manifests  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--data", required=True)
parser.add_argument("--name", required=True)
parser.add_argument("--valid", type=float, default=0.25, help="fraction of files held out for validation")
parser.add_argument("--text", default=None, help="caption for entries that have none")
parser.add_argument("--sample-rate", type=int, default=32000)
parser.add_argument("--channels", type=int, default=1)
opts = parser.parse_args()
try:
    out = build_manifests(opts.data, opts.name, opts.sample_rate, opts.channels, opts.valid, opts.text)
except DatasetError as err:
    sys.exit(f"error: {err}")
print(f"Dataset {opts.name}: {out} (report: {out / 'report.json'})")
