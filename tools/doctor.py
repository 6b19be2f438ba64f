"""make doctor [MODEL=<musicgen folder>] [T5=<folder>]"""
import argparse
import sys

from musicgen_finetune import environment

environment.prepare()
from musicgen_finetune import doctor  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", default=None)
parser.add_argument("--t5", default=None)
opts = parser.parse_args()
sys.exit(doctor.run(opts.model, opts.t5))
